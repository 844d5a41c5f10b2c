"""Study analysis: Corona Score, case decision, infection mask, input discovery (unit level)."""

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from radlogics_repro import analyze, io


def test_corona_score_of_a_constant_map_by_hand():
    fine = np.zeros((5, 10, 10), np.float32)
    fine[1:4] = 0.5
    positive = np.array([False, True, True, False, False])
    # 2 positive slices x 100 px x 0.5 x (0.7 x 0.7 mm^2) x 2.5 mm / 1000 = 0.1225 cm^3;
    # slice 3 carries map values but is not positive: it does not count
    score = analyze.corona_score_cm3(fine, positive, (2.5, 0.7, 0.7))
    assert score == pytest.approx(2 * 100 * 0.5 * 0.49 * 2.5 / 1000)


def test_full_map_equals_the_lung_volume():
    fine = np.ones((4, 8, 8), np.float32)
    score = analyze.corona_score_cm3(fine, np.ones(4, bool), (5.0, 1.0, 1.0))
    assert score == pytest.approx(4 * 64 * 5.0 / 1000)


@pytest.mark.parametrize(
    "positive, lung, threshold, expected",
    [(5, 50, 0.1, (True, 0.1)), (4, 50, 0.1, (False, 0.08)), (0, 0, 0.1, (False, 0.0)),
     (50, 50, 1.0, (True, 1.0))],
)
def test_case_decision_rule(positive, lung, threshold, expected):
    suspected, ratio = analyze.decide_case(positive, lung, threshold)
    assert suspected is expected[0]
    assert ratio == pytest.approx(expected[1])


def test_infection_labels_split_by_hu_and_stay_in_lung():
    hu = np.full((6, 30, 30), -870.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 2:28, 2:28] = True
    fine = np.zeros(hu.shape, np.float32)
    fine[1:5, 5:20, 5:20] = 0.9
    hu[1:5, 5:12, 5:20] = -550.0   # ground glass
    hu[1:5, 12:20, 5:20] = -50.0   # consolidation
    settings = analyze.AnalysisSettings(map_threshold=0.5, blur_sigma_mm=0.5)
    labels = analyze.infection_labels_from_map(fine, hu, lung, (1.0, 1.0, 1.0), settings)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[2, 6:11, 6:19] == 1).all()
    assert (labels[2, 13:19, 6:19] == 2).all()
    assert not labels[~lung].any()
    # aerated lung (-870 HU) under the map is not infection
    assert not labels[hu < -750].any()
    none = analyze.infection_labels_from_map(np.zeros_like(fine), hu, lung, (1, 1, 1), settings)
    assert not none.any()


def test_case_id_is_a_hash_not_a_name():
    study = io.study_from_array(np.zeros((3, 4, 4), np.float32), (1, 1, 1),
                                metadata={"study_uid_hash": "abc", "series_uid_hash": "def"})
    case_id = analyze.case_id_for(study)
    assert case_id.startswith("case-") and len(case_id) == 15
    assert case_id == analyze.case_id_for(study)


def test_discover_inputs(tmp_path):
    study_dir = tmp_path / "one"
    study_dir.mkdir()
    (study_dir / "IM0001").write_bytes(b"x")
    assert list(analyze.discover_inputs(study_dir)["image"]) == [str(study_dir)]
    batch = tmp_path / "many"
    (batch / "s1").mkdir(parents=True)
    (batch / "s2").mkdir()
    (batch / "s3.nii.gz").write_bytes(b"x")
    assert len(analyze.discover_inputs(batch)) == 3
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"case_id": ["a"], "image": ["one"], "patient_id": ["P1"], "day": [0]}).to_csv(
        manifest, index=False)
    frame = analyze.discover_inputs(manifest)
    assert frame["image"].iloc[0] == str(study_dir)
    with pytest.raises(analyze.AnalysisError, match="does not exist"):
        analyze.discover_inputs(tmp_path / "missing")
    empty = tmp_path / "empty.csv"
    empty.write_text("case_id,image\n")
    with pytest.raises(analyze.AnalysisError, match="no rows"):
        analyze.discover_inputs(empty)


def test_missing_models_name_the_training_commands(tmp_path):
    with pytest.raises(analyze.AnalysisError, match=r"train \+experiment=lung_unet"):
        analyze.load_analysis_models(None, None, runs_dir=tmp_path)


# ---- end to end on a tiny synthetic study with tiny untrained models ------------------------------


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    from radlogics_repro import synth

    out = tmp_path_factory.mktemp("synth") / "ds"
    manifest = synth.generate_dataset(out, n_patients=2, seed=5, in_plane=64, slices=20,
                                      slice_mm=5.0, covid_fraction=1.0, longitudinal_fraction=0.0,
                                      formats=("nifti", "dicom"), progress=False)
    frame = pd.read_csv(manifest)
    return out, frame


def _cli(args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "radlogics_repro.analyze", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_analyze_cli_end_to_end_writes_every_output_and_no_identity(tiny_models, dicom_case,
                                                                    tmp_path):
    import json

    out, frame = dicom_case
    dicom_dir = out / frame["dicom"].iloc[0]
    result = _cli([f"input={dicom_dir}", f"output_dir={tmp_path / 'analysis'}",
                   f"lung_model={tiny_models['lung']}",
                   f"classifier_model={tiny_models['classifier']}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    folders = [p for p in (tmp_path / "analysis").iterdir() if p.name.startswith("case-")]
    assert len(folders) == 1
    case = folders[0]
    for name in ("report.json", "slices.csv", "lung_mask.nii.gz", "infection_map.nii.gz",
                 "infection_mask.nii.gz", "overview_3d.png", "report.html"):
        assert (case / name).exists(), name
    document = json.loads((case / "report.json").read_text())
    assert document["schema"] == "radlogics_repro.study_report"
    assert document["schema_version"] == 1
    assert "Research use only" in document["notice"]
    assert {"decision", "corona_score_cm3", "volumes", "timings_s", "provenance", "input"} <= set(
        document)
    assert document["decision"]["threshold"] == 0.5
    assert document["provenance"]["classifier_model"]["init"] == "random"
    slices = pd.read_csv(case / "slices.csv")
    assert len(slices) == document["input"]["n_slices"]
    # the planted DICOM identity never reaches any output byte
    import pydicom

    planted = pydicom.dcmread(next(iter(sorted(dicom_dir.iterdir()))), stop_before_pixels=True)
    secrets = [str(planted.PatientName), str(planted.PatientID), str(planted.PatientBirthDate)]
    assert all(secrets)
    for file in (tmp_path / "analysis").rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            for secret in secrets:
                assert secret.encode() not in content, (file, secret)
    # a second run does not overwrite: the finished case is reported as done earlier
    again = _cli([f"input={dicom_dir}", f"output_dir={tmp_path / 'analysis'}",
                  f"lung_model={tiny_models['lung']}",
                  f"classifier_model={tiny_models['classifier']}"], cwd=tmp_path)
    assert again.returncode == 0


def test_analyze_cli_bad_input_exits_2_with_one_line_and_no_output(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "IM0001.dcm").write_bytes(b"DICM" * 10)
    (bad / "notes.txt").write_text("hello")
    result = _cli([f"input={bad}", f"output_dir={tmp_path / 'analysis'}",
                   f"lung_model={tiny_models['lung']}",
                   f"classifier_model={tiny_models['classifier']}"], cwd=tmp_path)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0]
    assert "Traceback" not in result.stderr
    leftovers = [p for p in (tmp_path / "analysis").glob("*") if p.name != "logs"] \
        if (tmp_path / "analysis").exists() else []
    assert leftovers == []


def test_analyze_without_models_names_the_training_commands(tmp_path):
    result = _cli([f"input={tmp_path}", f"paths.runs_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "python -m radlogics_repro.train +experiment=" in result.stderr


# ---- batches split across machines, and the compute precision ----------------------------------


def test_shards_are_disjoint_cover_the_batch_and_merge(tiny_models, dicom_case, tmp_path):
    out, frame = dicom_case
    manifest = tmp_path / "studies.csv"
    pd.DataFrame({"case_id": ["s1", "s2", "s3"], "patient_id": ["p1", "p1", "p2"], "day": [0, 5, 0],
                  "image": [str(out / frame["image"].iloc[i]) for i in (0, 1, 1)]}
                 ).to_csv(manifest, index=False)
    inputs = analyze.discover_inputs(manifest)
    parts = [analyze.select_shard(inputs, i, 2) for i in range(2)]
    assert sorted(sum((list(p["case_id"]) for p in parts), [])) == ["s1", "s2", "s3"]
    loaded = analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]))
    settings = analyze.AnalysisSettings()
    analysis = tmp_path / "analysis"
    analyze.run_batch(parts[0], loaded, settings, analysis, progress=False,
                      summary_name=analyze.shard_summary_name(0, 2))
    with pytest.raises(analyze.AnalysisError, match=r"shard\(s\) \[1\] of 2 have not finished"):
        analyze.merge_shard_summaries(analysis)
    analyze.run_batch(parts[1], loaded, settings, analysis, progress=False,
                      summary_name=analyze.shard_summary_name(1, 2))
    assert not (analysis / "longitudinal").exists()      # curves need every shard
    merged = analyze.merge_shard_summaries(analysis)
    assert sorted(merged["case_id"]) == ["s1", "s2", "s3"] and set(merged["status"]) == {"ok"}
    assert (analysis / "summary.csv").exists()
    assert (analysis / "longitudinal" / "p1.csv").exists()   # p1 has two scans


@pytest.mark.parametrize("shard", ["2/2", "-1/3", "a/b", "1", "0/0"])
def test_bad_shard_is_refused(shard):
    with pytest.raises(analyze.AnalysisError, match="shard="):
        analyze.parse_shard(shard)


def test_models_run_at_a_chosen_precision(tiny_models, dicom_case):
    from radlogics_repro import io

    out, frame = dicom_case
    as_trained = analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]))
    bf16 = analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]),
                                        precision="mixed_bfloat16")
    assert bf16.classifier.get_layer("conv4_block6_out").compute_dtype == "bfloat16"
    assert bf16.lung_unet.output.dtype == "float32" and bf16.classifier.output.dtype == "float32"
    study = io.load_study(out / frame["image"].iloc[0])
    settings = analyze.AnalysisSettings()
    a = analyze.analyze_study(study, as_trained, settings, case_id="a")
    b = analyze.analyze_study(study, bf16, settings, case_id="b")
    assert np.mean(a.lung_labels == b.lung_labels) > 0.95
    with pytest.raises(analyze.AnalysisError, match="precision"):
        analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]),
                                     precision="int8")


def test_map_within_lung_zeroes_the_map_outside_the_lung_and_scores_what_remains(tiny_models,
                                                                                  dicom_case):
    from radlogics_repro import io

    out, frame = dicom_case
    models = analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]))
    study = io.load_study(out / frame["image"].iloc[0])
    whole = analyze.analyze_study(study, models, analyze.AnalysisSettings(), case_id="a")
    within = analyze.analyze_study(study, models, analyze.AnalysisSettings(map_within_lung=True),
                                   case_id="b")
    lung = whole.lung_labels > 0
    np.testing.assert_array_equal(within.lung_labels, whole.lung_labels)
    assert whole.fine_map[~lung].max() > 0               # the crop's map reaches outside the lung
    assert within.fine_map[~lung].max() == 0
    np.testing.assert_array_equal(within.fine_map[lung], whole.fine_map[lung])
    positive = whole.slices["positive"].to_numpy(bool)
    by_hand = whole.fine_map[positive].astype(np.float64)[lung[positive]].sum() \
        * study.voxel_volume_mm3 / 1000.0
    assert within.summary["corona_score_cm3"] == pytest.approx(by_hand, rel=2e-3)  # float16 map
    assert 0 < within.summary["corona_score_cm3"] < whole.summary["corona_score_cm3"]


def test_fixed_map_scale_takes_the_cards_scales_or_names_the_calibration(tiny_models, dicom_case):
    import dataclasses

    from radlogics_repro import io, localize

    out, frame = dicom_case
    models = analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]))
    study = io.load_study(out / frame["image"].iloc[0])
    fixed = analyze.AnalysisSettings(map_scale="fixed")
    assert analyze.AnalysisSettings().map_scale == "fixed"  # the default
    bare = dataclasses.replace(models, classifier_card={
        key: value for key, value in models.classifier_card.items() if key != "gradcam_scales"})
    with pytest.raises(analyze.AnalysisError, match="calibrate_maps classifier_run="):
        analyze.analyze_study(study, bare, fixed)
    per_slice = analyze.analyze_study(study, models, analyze.AnalysisSettings(map_scale="per_slice"))
    positive = per_slice.slices["positive"].to_numpy(bool)
    # one scale far above every raw map: weak maps everywhere, far below min-max's
    card = {**models.classifier_card, "gradcam_scales": {"quantile": 0.9, "score": "logit", "slices": 1,
            "layers": {name: 1e6 for name in localize.GRADCAM_LAYERS}}}
    calibrated = dataclasses.replace(models, classifier_card=card)
    weak = analyze.analyze_study(study, calibrated, fixed)
    assert weak.fine_map.max() < 1e-3 < per_slice.fine_map.max()
    assert 0 <= weak.summary["corona_score_cm3"] < 1e-3 * per_slice.summary["corona_score_cm3"]
    np.testing.assert_array_equal(weak.slices["positive"], per_slice.slices["positive"])
    # a tiny scale: every map saturates at 1, so the Corona Score is the positive crops' area
    card["gradcam_scales"]["layers"] = {name: 1e-30 for name in localize.GRADCAM_LAYERS}
    full = analyze.analyze_study(study, calibrated, fixed)
    assert full.fine_map[positive].max() == 1.0
    assert full.summary["corona_score_cm3"] > per_slice.summary["corona_score_cm3"]
    with pytest.raises(analyze.AnalysisError, match="engine=fused"):
        analyze.analyze_study(study, calibrated, dataclasses.replace(fixed, engine="tf-keras-vis"))


@pytest.mark.parametrize("lung_box", [(slice(None), slice(None)), (slice(9, 30), slice(3, 27))])
def test_slab_wise_infection_mask_equals_the_whole_volume_computation(lung_box):
    rng = np.random.default_rng(3)
    shape = (70, 40, 36)
    fine_map = (rng.random(shape) * 0.6).astype(np.float16)
    fine_map[20:50, 8:30, 6:20] = 0.9                      # a lesion across several slabs
    lung = np.zeros(shape, bool)                           # everywhere, or inside an in-plane box
    lung[:, lung_box[0], lung_box[1]] = rng.random(shape)[:, lung_box[0], lung_box[1]] > 0.05
    hu = rng.uniform(-1000, 200, shape).astype(np.float32)
    spacing = (2.5, 1.0, 1.0)
    settings = analyze.AnalysisSettings()
    slabs = analyze.infection_labels_from_map(fine_map, hu, lung, spacing, settings, chunk=7)
    sigma = [settings.blur_sigma_mm / s for s in spacing]
    seed = (fine_map >= settings.map_threshold) & lung
    region = (ndimage.gaussian_filter(seed.astype(np.float32), sigma=sigma) >= 0.5) & lung
    whole = np.zeros(shape, np.uint8)
    whole[region & (hu >= -750) & (hu < -300)] = 1
    whole[region & (hu >= -300) & (hu <= 100)] = 2
    assert whole.any()
    np.testing.assert_array_equal(slabs, whole)


def test_unit_map_file_reads_back_within_one_step(tmp_path):
    study = io.study_from_array(np.zeros((5, 8, 8), np.float32), (2.0, 1.0, 1.0))
    values = np.linspace(0, 1, 5 * 8 * 8, dtype=np.float32).reshape(5, 8, 8).astype(np.float16)
    path = io.save_unit_map(study, values, tmp_path / "map.nii.gz", chunk=2)
    back = io.load_mask(path, study)
    assert back.dtype == np.float32
    assert np.abs(back - values.astype(np.float32)).max() <= 0.5 / 255 + 1e-3
