"""Helpers of the result scripts in experiments/ (they are scripts, not a package: imported by path)."""

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import ablations  # noqa: E402
import analyze_speed_options  # noqa: E402
import classifier_auc  # noqa: E402
import corona_map_scale  # noqa: E402
import corona_within_lung  # noqa: E402
import crop_label_loss  # noqa: E402
import lung_decoder_sweep  # noqa: E402
import lung_dice  # noqa: E402
import paper_tables  # noqa: E402
import summarize_run  # noqa: E402

from radlogics_repro import data  # noqa: E402


def _slice_set(case_ids, z) -> data.SliceSet:
    n = len(z)
    return data.SliceSet(images=np.zeros((n, 4, 4), np.float16), masks=np.zeros((n, 0, 0), np.uint8),
                         labels=np.zeros(n, np.uint8), case_ids=np.array(case_ids),
                         patient_ids=np.array(case_ids), z=np.array(z))


def test_lesion_areas_follow_case_and_slice_index(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id\n")
    slices = _slice_set(["B", "A", "A"], [2, 7, 0])
    assert classifier_auc.lesion_areas(manifest, slices) is None  # no slices.csv beside it
    pd.DataFrame({"case_id": ["A", "A", "B", "B"], "z": [0, 7, 2, 3],
                  "lesion_area_mm2": [0.0, 310.5, 12.0, 99.0]}).to_csv(tmp_path / "slices.csv", index=False)
    np.testing.assert_array_equal(classifier_auc.lesion_areas(manifest, slices), [12.0, 310.5, 0.0])
    missing = classifier_auc.lesion_areas(manifest, _slice_set(["A"], [5]))
    assert np.isnan(missing).all()


def test_run_wall_minutes_from_the_first_and_last_log_lines(tmp_path):
    assert summarize_run.run_wall_minutes(tmp_path) is None
    (tmp_path / "train.log").write_text(
        "[2026-11-22 22:13:16,001][__main__][INFO] - start\nno stamp here\n"
        "[2026-11-22 22:56:40,500][__main__][INFO] - done\n")
    assert summarize_run.run_wall_minutes(tmp_path) == pytest.approx(43.4)


def test_case_threshold_sweep_counts_by_hand(tmp_path):
    # two positive cases (ratios 0.3, 0.04) and two negative (0.12, 0.0)
    pd.DataFrame({"label": [1, 1, 0, 0], "positive_slice_ratio": [0.3, 0.04, 0.12, 0.0]}).to_csv(
        tmp_path / "cases.csv", index=False)
    sweep = ablations.case_threshold_sweep(tmp_path / "cases.csv").set_index("case threshold")
    assert sweep.loc[0.02, "sensitivity"] == 1.0 and sweep.loc[0.02, "specificity"] == 0.5
    assert sweep.loc[0.1, "sensitivity"] == 0.5 and sweep.loc[0.1, "specificity"] == 0.5
    assert sweep.loc[0.2, "sensitivity"] == 0.5 and sweep.loc[0.2, "specificity"] == 1.0
    assert sweep.loc[0.5, "sensitivity"] == 0.0 and (sweep["cases"] == 4).all()


def test_init_ablation_runs_offline_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert not ablations.imagenet_file_cached()
    assert not ablations.run_init_ablation("auto", cached=False)
    assert ablations.run_init_ablation("always", cached=False)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    assert ablations.imagenet_file_cached()
    assert ablations.run_init_ablation("auto", cached=True)
    assert not ablations.run_init_ablation("never", cached=True)


def test_an_evaluation_of_other_models_is_not_reused(tmp_path):
    lung, classifier = tmp_path / "runs" / "lung_unet" / "L1", tmp_path / "runs" / "classifier" / "C1"
    assert paper_tables.model_file(lung) == "runs/lung_unet/L1/model.keras"
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text(
        '{"models": {"lung": "runs/lung_unet/L1/model.keras", '
        '"classifier": "runs/classifier/C1/model.keras"}}')
    assert paper_tables.evaluate(folder, "eval", lung, classifier, None) == folder / "metrics.json"
    with pytest.raises(SystemExit, match="evaluated other models"):
        paper_tables.evaluate(folder, "eval", lung, tmp_path / "runs" / "classifier" / "C2", None)


def test_command_line_specs_and_provenance_sentence():
    assert lung_decoder_sweep.holdout_spec("results/a.csv:preset") == (Path("results/a.csv"), "preset")
    with pytest.raises(Exception, match="CSV:MODEL"):
        lung_decoder_sweep.holdout_spec("results/a.csv")
    assert lung_dice.named_path("base=runs/x/model.keras", "--model") == ("base", "runs/x/model.keras")
    started = lung_dice.Start(time.time() - 90, {"commit": "abc1234", "date": "2026-11-23T07:00:00",
                                                 "machine": "x86_64", "tensorflow": "2.21.0"})
    sentence = lung_dice.produced_by("classifier_auc.py", ["--run", "a=b"], started)
    assert sentence.startswith("Produced by `python experiments/classifier_auc.py --run a=b` at commit "
                               "`abc1234` on 2026-11-23T07:00:00")  # the start's checkout, not the end's
    assert sentence.endswith("the script took 1.5 min.")


def test_analyze_speed_options_writes_its_table_on_a_small_study(tiny_models, tmp_path):
    out = tmp_path / "speed.md"
    assert analyze_speed_options.main([
        "--lung-model", str(tiny_models["lung"]), "--classifier-model", str(tiny_models["classifier"]),
        "--slice-step-mm", "3", "--repeats", "1", "--slices", "24", "--in-plane", "96",
        "--out", str(out)]) == 0
    text = out.read_text()
    assert "Research use only" in text and "Produced by `python experiments/analyze_speed_options.py" in text
    for variant in ("U-Net on every slice", "U-Net on slices <= 3 mm apart", "(analyze now)", "(before)"):
        assert variant in text, variant
    differences = [line for line in text.splitlines() if "(before)" in line]
    assert float(differences[0].split("|")[-2]) <= 1e-3  # the two ways give the same maps
    assert analyze_speed_options.main(["--lung-model", "x", "--classifier-model", "y",
                                       "--out", str(out)]) == 2  # never overwrites a result


def test_corona_within_lung_scores_both_sums_from_one_analysis(tiny_models, tiny_dataset, tmp_path):
    out = tmp_path / "corona.md"
    args = ["--lung-run", str(tiny_models["lung"].parent),
            "--classifier-run", str(tiny_models["classifier"].parent),
            "--data", f"tiny={tiny_dataset}:train", "--out", str(out)]
    assert corona_within_lung.main(args) == 0
    text = out.read_text()
    assert "Research use only" in text and "Produced by `python experiments/corona_within_lung.py" in text
    assert "whole lung crop (METHOD.md literally)" in text and "within the segmented lung" in text
    cases = pd.read_csv(out.with_suffix(".csv"))
    assert len(cases) >= 2 and (cases["positive_slices"] > 0).any()
    assert (cases["within_lung_cm3"] <= cases["whole_crop_cm3"] + 1e-6).all()
    assert (cases["within_lung_cm3"] < cases["whole_crop_cm3"]).any()   # the crop reaches past the lung
    assert corona_within_lung.main(args) == 2                            # never overwrites a result


def test_lung_dice_keeps_the_thin_slice_scans_of_a_split(tmp_path):
    for name in ("a.nii.gz", "l.nii.gz", "m.nii.gz"):
        (tmp_path / name).touch()
    pd.DataFrame({"case_id": ["C1", "C2", "C3", "C4"], "patient_id": ["P1", "P2", "P3", "P4"],
                  "split": ["test", "test", "test", "train"], "spacing_z_mm": [1.2, 2.5, 4.0, 1.0],
                  "image": "a.nii.gz", "lung_mask": "l.nii.gz", "lesion_mask": "m.nii.gz"}
                 ).to_csv(tmp_path / "manifest.csv", index=False)
    spec = f"{tmp_path / 'manifest.csv'}:test"
    assert list(lung_dice.dataset_rows(spec, None)[0]["case_id"]) == ["C1", "C2", "C3"]
    assert list(lung_dice.dataset_rows(spec, None, max_slice_mm=2.5)[0]["case_id"]) == ["C1", "C2"]


def test_crop_keeps_a_central_lesion_and_can_cut_a_corner_one():
    size, pixel_mm2 = 40, 2.0
    central = np.zeros((size, size), np.float32)
    central[14:26, 14:26] = 1.0   # inside [0.15 S, 0.85 S): in every window of side >= 0.85 S
    corner = np.zeros((size, size), np.float32)
    corner[0:3, 0:3] = 1.0
    rng = np.random.default_rng(0)
    kept = crop_label_loss.visible_areas(central, pixel_mm2, draws=30, min_scale=0.85,
                                         max_degrees=0.0, rng=rng, seed=0)
    np.testing.assert_allclose(kept, 144 * pixel_mm2)
    whole = crop_label_loss.visible_areas(corner, pixel_mm2, draws=5, min_scale=1.0,
                                          max_degrees=0.0, rng=rng, seed=0)
    np.testing.assert_allclose(whole, 9 * pixel_mm2)      # no crop: all of it
    cut = crop_label_loss.visible_areas(corner, pixel_mm2, draws=60, min_scale=0.85,
                                        max_degrees=0.0, rng=rng, seed=0)
    assert cut.min() == 0.0 and cut.max() == 9 * pixel_mm2  # some windows miss the corner


def test_crop_label_loss_reports_by_lesion_area_and_never_overwrites(tiny_dataset, tmp_path):
    out = tmp_path / "crop.md"
    args = ["--manifest", str(tiny_dataset), "--split", "train", "--draws", "3", "--size", "32",
            "--step-mm", "0", "--min-scale", "0.85", "--min-scale", "0.5", "--out", str(out)]
    assert crop_label_loss.main(args) == 0
    text = out.read_text()
    assert "Research use only" in text and "Produced by `python experiments/crop_label_loss.py" in text
    for setting in ("crop 0.85, rotation 15 deg", "crop 0.5, rotation 15 deg", "rotation 15 deg only"):
        assert f"| {setting} | all |" in text
    assert crop_label_loss.main(args) == 2                     # never overwrites a result


def test_corona_map_scale_variants_are_the_analysis_scores(tiny_models, tiny_dataset, tmp_path):
    import dataclasses

    from radlogics_repro import analyze, io

    settings = analyze.AnalysisSettings(precision="float32", map_scale="per_slice")
    models = analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]),
                                          precision="float32")
    rows, *_ = lung_dice.dataset_rows(f"{tiny_dataset}:train", 2)
    scans = [corona_map_scale.scan_maps(row, models, settings) for _, row in rows.iterrows()]
    assert all(len(s.boxes) > 0 for s in scans)  # the tiny card calls every lung slice positive
    cases, area, lesion = corona_map_scale.variant_cases(scans, corona_map_scale.PER_SLICE, None, 32)
    for (_, row), score in zip(rows.iterrows(), cases["corona_score_cm3"], strict=True):
        report = analyze.analyze_study(io.load_study(row["image"]), models, settings)
        assert score == pytest.approx(report.summary["corona_score_cm3"], rel=2e-3)
    assert len(area) == len(lesion) == sum(len(s.boxes) for s in scans)
    # a scan without a positive slice scores 0 and adds no maximum to the scales
    first = next(rows.iterrows())[1]
    none = corona_map_scale.scan_maps(first, models, dataclasses.replace(settings, slice_threshold=1.0))
    assert len(none.boxes) == 0 and len(none.lesion_mm2) == 0
    empty, *_ = corona_map_scale.variant_cases([none], corona_map_scale.PER_SLICE, None, 32)
    assert empty["corona_score_cm3"].tolist() == [0.0]
    assert corona_map_scale.layer_scales([none, *scans], 0.5) == corona_map_scale.layer_scales(scans, 0.5)
    # fixed scales: the maxima's top quantile leaves every map in [0, 1]; a lower one clips more
    top, low = corona_map_scale.layer_scales(scans, 1.0), corona_map_scale.layer_scales(scans, 0.25)
    for name in top:
        assert 0 < low[name] <= top[name]
        assert max(m.max() for m in corona_map_scale.scaled_maps(scans[0], top).values()) <= 1.0
    fixed_top, *_ = corona_map_scale.variant_cases(scans, "top", top, 32)
    fixed_low, *_ = corona_map_scale.variant_cases(scans, "low", low, 32)
    assert (fixed_low["corona_score_cm3"] >= fixed_top["corona_score_cm3"]).all()
    # a fixed variant is what analyze computes with analysis.map_scale=fixed and those scales
    card = {**models.classifier_card, "gradcam_scales": {"layers": low}}
    calibrated = dataclasses.replace(models, classifier_card=card)
    fixed = dataclasses.replace(settings, map_scale="fixed")
    for (_, row), score in zip(rows.iterrows(), fixed_low["corona_score_cm3"], strict=True):
        report = analyze.analyze_study(io.load_study(row["image"]), calibrated, fixed)
        assert score == pytest.approx(report.summary["corona_score_cm3"], rel=2e-3)


def test_corona_map_scale_writes_its_table_and_never_overwrites(tiny_models, tiny_dataset, tmp_path):
    out = tmp_path / "scale.md"
    args = ["--lung-run", str(tiny_models["lung"].parent),
            "--classifier-run", str(tiny_models["classifier"].parent),
            "--data", f"tiny={tiny_dataset}:train", "--choose-on", "tiny", "--quantiles", "0.5", "0.9",
            "--max-scans", "2", "--out", str(out)]
    assert corona_map_scale.main(args) == 0
    text = out.read_text()
    assert "Research use only" in text and "Produced by `python experiments/corona_map_scale.py" in text
    for variant in ("per-slice min-max", "fixed q=0.5", "fixed q=0.9", "Chosen on `tiny`"):
        assert variant in text, variant
    cases = pd.read_csv(out.with_suffix(".csv"))
    assert len(cases) == 2 * 3 and set(cases["map"]) == {"per-slice min-max", "fixed q=0.5", "fixed q=0.9"}
    assert corona_map_scale.main(args) == 2                          # never overwrites a result
    with pytest.raises(SystemExit):
        corona_map_scale.main([*args[:-2], "--choose-on", "other", "--out", str(tmp_path / "x.md")])
