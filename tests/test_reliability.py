"""Reliability and security (issue 8): a corpus of broken and awkward inputs, generated here (never
committed), and what each one gives: a one-line error naming the file and the problem, or a
documented warning; never a partial output folder, never identifying data in an output.

Cases already tested elsewhere are not repeated; results/reliability.md lists every case with the
test that covers it.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from radlogics_repro import atomic, cli, data, io
from radlogics_repro.io import StudyReadError, load_study, write_dicom_series

REPO = Path(__file__).resolve().parents[1]
SPACING = (4.0, 1.0, 1.0)  # (z, y, x) mm
SECRETS = {  # planted in the synthetic DICOM; no output byte may carry them
    "PatientName": "Zyxwa^Qorvath", "PatientID": "PID-93817", "PatientBirthDate": "19610314",
    "InstitutionName": "St Elsewhere Infirmary", "AccessionNumber": "ACC77123",
    "ReferringPhysicianName": "Housewright^Greg",
}


def _chest(n=12, size=64) -> np.ndarray:
    """(z, y, x) HU: air around a soft-tissue body (40 HU) holding two lungs (-850 HU)."""
    z, y, x = np.mgrid[:n, :size, :size]
    hu = np.where(((x - 32) / 29) ** 2 + ((y - 32) / 23) ** 2 <= 1, 40.0, -1000.0)
    for cx in (19, 45):
        lung = (((x - cx) / 10) ** 2 + ((y - 30) / 15) ** 2 <= 1) & (z >= 1) & (z < n - 1)
        hu[lung] = -850.0
    return hu.astype(np.float32)


def _abdomen(n=12, size=64) -> np.ndarray:
    """(z, y, x) HU: air around a body of fat (-100 HU), muscle and organs (40..60 HU); no lung."""
    z, y, x = np.mgrid[:n, :size, :size]
    hu = np.where(((x - 32) / 29) ** 2 + ((y - 32) / 23) ** 2 <= 1, -100.0, -1000.0)
    hu[((x - 32) / 25) ** 2 + ((y - 32) / 19) ** 2 <= 1] = 40.0
    hu[((x - 24) / 10) ** 2 + ((y - 28) / 9) ** 2 <= 1] = 60.0  # liver
    return hu.astype(np.float32)


def _dicom(folder: Path, hu=None, seed=0, **extra) -> list[Path]:
    identity = {k: v for k, v in SECRETS.items()
                if k not in ("PatientName", "PatientID", "PatientBirthDate")}
    return write_dicom_series(_chest() if hu is None else hu, SPACING, folder, seed=seed,
                              patient_name=SECRETS["PatientName"], patient_id=SECRETS["PatientID"],
                              birth_date=SECRETS["PatientBirthDate"], extra={**identity, **extra})


def _nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data_xyz, affine), str(path))
    return path


def _one_line_error(err: BaseException, names: str) -> str:
    message = str(err)
    assert "\n" not in message
    assert names in message, (names, message)
    return message


# =============================================================================================
# Study input corpus (cases not already in tests/test_io.py)
# =============================================================================================


@pytest.mark.parametrize("modality, sop_class", [
    ("DX", "1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    ("CR", "1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
])
def test_xray_instead_of_ct_is_refused_naming_the_modality(tmp_path, modality, sop_class):
    files = _dicom(tmp_path / "xray", hu=_chest(n=1), Modality=modality, SOPClassUID=sop_class)
    for target in (tmp_path / "xray", files[0]):  # the folder and the single file
        with pytest.raises(StudyReadError, match=f"no CT images \\(modalities found: {modality}"
                           ) as err:
            load_study(target)
        assert str(err.value).startswith(f"{target}: ")
        _one_line_error(err.value, str(target))


def test_jpeg_lossless_without_a_decoder_names_the_syntax_and_the_fix(tmp_path):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    files = _dicom(tmp_path / "jpeg")
    ds = pydicom.dcmread(files[3])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # the usual CT compression
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(files[3], enforce_file_format=True)
    with pytest.raises(StudyReadError) as err:
        load_study(tmp_path / "jpeg")
    message = _one_line_error(err.value, str(files[3]))
    assert "JPEG Lossless" in message and "pip install pylibjpeg pylibjpeg-libjpeg" in message


def test_oblique_permuted_nifti_is_read_canonical_and_masks_land_on_its_grid(tmp_path):
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    # stored axes: i -> superior (2.5 mm), j -> anterior-right oblique (0.8), k -> oblique (0.9)
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([[0, 0, 2.5], rotation @ [0, -0.8, 0], rotation @ [-0.9, 0, 0]])
    affine[:3, 3] = (12.0, -7.0, 30.0)
    stored = np.zeros((5, 7, 9), np.int16) - 1000
    stored[3, 2, 6] = 500  # one marker voxel
    source = _nifti(tmp_path / "oblique.nii.gz", stored, affine)
    study = load_study(source)
    assert study.metadata["warnings"] == []
    assert study.hu.shape == (5, 7, 9)  # (z, y, x): stored i is z
    assert study.spacing == pytest.approx((2.5, 0.8, 0.9))
    assert nib.aff2axcodes(study.affine) == ("L", "P", "S")
    z, y, x = np.argwhere(study.hu == 500)[0]
    np.testing.assert_allclose(study.affine @ [x, y, z, 1], affine @ [3, 2, 6, 1], atol=1e-9)
    mask = (study.hu == 500).astype(np.uint8)
    written = nib.load(io.save_mask(study, mask, tmp_path / "mask.nii.gz"))
    assert written.shape == stored.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert np.asarray(written.dataobj)[3, 2, 6] == 1 and np.asarray(written.dataobj).sum() == 1


def test_nifti_with_nan_voxels_reads_them_as_air_with_a_warning(tmp_path, caplog):
    stored = np.full((6, 6, 4), 40.0, np.float32)
    stored[0, :, :] = -1000.0
    stored[:2, :2, :] = np.nan  # outside the reconstructed field of view
    stored[5, 5, 3] = np.inf
    with caplog.at_level(logging.WARNING, logger="radlogics_repro.io"):
        study = load_study(_nifti(tmp_path / "nan.nii.gz", stored, np.diag([-1, -1, 2.0, 1])))
    assert np.isfinite(study.hu).all() and study.hu.min() == -1000.0
    assert study.metadata["warnings"] == ["17 NaN or infinite voxel(s) set to -1000 HU (air)"]
    assert any("17 NaN" in r.message and "nan.nii.gz" in r.message for r in caplog.records)
    with pytest.raises(StudyReadError, match="every voxel is NaN or infinite") as err:
        load_study(_nifti(tmp_path / "allnan.nii.gz", np.full((3, 3, 2), np.nan, np.float32),
                          np.eye(4)))
    _one_line_error(err.value, "allnan.nii.gz")


def test_nifti_with_a_singular_affine_is_refused(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4))
    image.set_sform(np.diag([1, 1, 0, 1.0]), code=2)  # a zero slice step (nibabel reads the sform)
    source = tmp_path / "flat.nii.gz"
    nib.save(image, str(source))
    with pytest.raises(StudyReadError, match="invalid NIfTI affine") as err:
        load_study(source)
    _one_line_error(err.value, str(source))


# =============================================================================================
# Manifests
# =============================================================================================


def _manifest(tmp_path, rows, text=None) -> Path:
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "manifest.csv"
    if text is not None:
        path.write_text(text)
    else:
        pd.DataFrame(rows, columns=["case_id", "patient_id", "split", "image"]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("rows, text, problem", [
    (None, "", "not a readable CSV manifest"),  # zero-byte file
    ([["c1", "P1", "train", "a.nii.gz"], ["", "P2", "val", "b.nii.gz"]], None,
     "row 2 has an empty 'case_id'"),
    ([["c1", "P1", "train", "a.nii.gz"], ["c1", "P2", "val", "b.nii.gz"]], None,
     "case_id(s) ['c1'] appear in more than one row"),
    ([["../../etc", "P1", "train", "a.nii.gz"]], None,
     "row 1: case_id '../../etc' cannot name a file or folder: contains a path separator"),
    ([[".hidden", "P1", "train", "a.nii.gz"]], None, "starts with a dot"),
    ([["c1", "P1", "train", "a.nii.gz"], ["c2", "x\\..\\y", "val", "b.nii.gz"]], None,
     "row 2: patient_id 'x\\\\..\\\\y' cannot name a file or folder"),
    ([["c1", "", "train", "a.nii.gz"]], None, "row 1 has an empty 'patient_id'"),
])
def test_bad_manifest_ids_are_one_line_errors_naming_the_manifest(tmp_path, rows, text, problem):
    path = _manifest(tmp_path, rows, text)
    with pytest.raises(data.DatasetError) as err:
        data.read_manifest(path)
    message = _one_line_error(err.value, str(path))
    assert problem in message, message


def test_good_manifest_ids_pass(tmp_path):
    rows = [["case 1", "P-1", "train", "a.nii.gz"], ["c_2.v2", "P-1", "train", "b.nii.gz"]]
    frame = data.read_manifest(_manifest(tmp_path, rows))
    assert list(frame["case_id"]) == ["case 1", "c_2.v2"]


# =============================================================================================
# Atomic outputs and names
# =============================================================================================


@pytest.mark.parametrize("name, problem", [
    ("../x", "path separator"), ("a/b", "path separator"), ("a\\b", "path separator"),
    ("..", "starts with a dot"), (".x.tmp", "starts with a dot"), ("", "empty"), (None, "empty"),
    ("a\nb", "control character"), (" a", "spaces"), ("x" * 201, "longer than 200 bytes"),
])
def test_unsafe_names_are_refused(tmp_path, name, problem):
    with pytest.raises(atomic.UnsafeNameError, match=problem) as err:
        atomic.child_path(tmp_path, name, "case_id")
    assert str(err.value).startswith("case_id ") and "\n" not in str(err.value)


def test_plain_names_stay_inside_the_parent(tmp_path):
    for name in ("case-1a2b", "P 7", "série_ä.v2", "x" * 200):
        child = atomic.child_path(tmp_path, name)
        assert child.parent == tmp_path and child.resolve().parent == tmp_path.resolve()


def test_output_folder_never_leaves_a_partial_folder(tmp_path):
    out = tmp_path / "case"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic.output_folder(out) as tmp:
            (tmp / "report.json").write_text("{}")
            raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    with atomic.output_folder(out) as tmp:
        (tmp / "report.json").write_text("first")
    with pytest.raises(FileExistsError, match="overwrite=true"):  # checked before any work
        with atomic.output_folder(out):
            pytest.fail("the body must not run")
    with pytest.raises(KeyboardInterrupt):
        with atomic.output_folder(out, overwrite=True) as tmp:
            (tmp / "report.json").write_text("second")
            raise KeyboardInterrupt
    assert (out / "report.json").read_text() == "first"  # an interrupted overwrite keeps the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    atomic.write_text(out / "note.txt", "x")
    assert sorted(p.name for p in out.iterdir()) == ["note.txt", "report.json"]


# =============================================================================================
# Settings (Hydra overrides of the wrong type)
# =============================================================================================


def _compose(config, overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config, overrides=overrides)


# what the user must add to an experiment (the local fine-tuning needs a manifest and a model)
_REQUIRED_BY_USER = {"finetune_local": ["data.manifest=local/manifest.csv",
                                        "model.init_from=runs/lung_unet/x/model.keras"]}


@pytest.mark.parametrize("overrides", [
    *[[f"+experiment={p.stem}", *_REQUIRED_BY_USER.get(p.stem, [])]
      for p in sorted((REPO / "conf" / "experiment").glob("*.yaml"))],
    ["+experiment=classifier", "trainer=smoke", "data=ucsd_covid_ct"],
])
def test_shipped_train_configs_pass_the_checks(overrides):
    cli.check_config(_compose("train", overrides), cli.TRAIN_CONFIG_RULES)


@pytest.mark.parametrize("override, message", [
    ("trainer.epochs=abc", "trainer.epochs=abc: expected an integer >= 1"),
    ("trainer.batch_size=-1", "trainer.batch_size=-1: expected an integer >= 1"),
    ("trainer.epochs=2.5", "trainer.epochs=2.5: expected an integer >= 1"),
    ("trainer.epochs=true", "trainer.epochs=true: expected an integer >= 1"),
    ("trainer.learning_rate=0", "trainer.learning_rate=0: expected a number > 0"),
    ("trainer.deterministic=yes", "trainer.deterministic=yes: expected true or false"),
    ("trainer.precision=float16", "expected one of auto, float32, mixed_bfloat16, mixed_float16"),
    ("trainer.max_cases_per_split=0", "expected an integer >= 1 or null"),
    ("data.input_size=40", "data.input_size=40: expected an integer >= 32 and a multiple of 16"),
    ("model.dense_units=[8,x]", "model.dense_units=[8, 'x']: expected a list of integers >= 1"),
    ("data.empty_fraction=1.5", "expected a number >= 0 and <= 1"),
    ("trainer.first_stage.input_size=40", "trainer.first_stage.input_size=40: expected an integer >= 32 and "
                                          "a multiple of 16"),
    ("trainer.first_stage.epochs=0", "trainer.first_stage.epochs=0: expected an integer >= 1"),
])
def test_wrong_train_settings_are_one_line_config_errors(override, message):
    cfg = _compose("train", ["+experiment=classifier", override])
    with pytest.raises(cli.ConfigError) as err:
        cli.check_config(cfg, cli.TRAIN_CONFIG_RULES)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_lung_noise_probability_outside_0_1_is_a_config_error():
    cfg = _compose("train", ["+experiment=lung_unet", "augment.noise_probability=2"])
    with pytest.raises(cli.ConfigError, match="augment.noise_probability=2: expected a number >= 0 and <= 1"):
        cli.check_config(cfg, cli.TRAIN_CONFIG_RULES)


def test_every_wrong_setting_is_listed_and_missing_values_are_named():
    from omegaconf import OmegaConf

    cfg = _compose("train", ["+experiment=lung_unet", "trainer.epochs=abc", "trainer.batch_size=-1"])
    OmegaConf.update(cfg, "data.manifest", "???")  # as conf/data/volumes.yaml leaves it
    with pytest.raises(cli.ConfigError) as err:
        cli.check_config(cfg, cli.TRAIN_CONFIG_RULES)
    assert str(err.value) == ("trainer.epochs=abc: expected an integer >= 1; trainer.batch_size=-1: "
                              "expected an integer >= 1; data.manifest: missing; set it with "
                              "data.manifest=...")


@pytest.mark.parametrize("config, rules, override, message", [
    ("analyze", cli.ANALYZE_CONFIG_RULES, "analysis.batch_size=0", "analysis.batch_size=0: expected"),
    ("analyze", cli.ANALYZE_CONFIG_RULES, "analysis.ggo_hu=[-300,-750]", "low < high"),
    ("analyze", cli.ANALYZE_CONFIG_RULES, "analysis.engine=gradcam", "one of fused, tf-keras-vis"),
    ("evaluate", cli.EVALUATE_CONFIG_RULES, "split=holdout", "split=holdout: expected one of"),
    ("evaluate", cli.EVALUATE_CONFIG_RULES, "n_boot=many", "n_boot=many: expected an integer >= 0"),
])
def test_analysis_settings_are_checked(config, rules, override, message):
    cli.check_config(_compose(config, []), rules)  # the shipped defaults pass
    with pytest.raises(cli.ConfigError, match=message):
        cli.check_config(_compose(config, [override]), rules)


def _run_module(module, args, cwd, timeout=240):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _assert_one_line_exit_2(result, *phrases):
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def test_train_cli_wrong_types_exit_2_before_any_output(tmp_path):
    run_dir = tmp_path / "run"
    result = _run_module("radlogics_repro.train", [
        "+experiment=classifier", "trainer.epochs=abc", "trainer.batch_size=-1",
        f"run_dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    _assert_one_line_exit_2(result, "trainer.epochs=abc: expected an integer >= 1",
                            "trainer.batch_size=-1: expected an integer >= 1")
    # Hydra creates the run folder (its .hydra/ and train.log) before the entry point runs;
    # nothing of the run itself is written and no data is generated.
    leftovers = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert leftovers <= {".hydra", "train.log"}
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("module, override, phrase", [
    ("radlogics_repro.train", "+experiment=no_such_experiment", "no_such_experiment"),
    ("radlogics_repro.bench", "note=a (b)", "Error parsing override 'note=a (b)'"),
])
def test_cli_override_hydra_cannot_parse_exits_2_with_one_line(tmp_path, module, override, phrase):
    result = _run_module(module, [override], cwd=tmp_path)
    _assert_one_line_exit_2(result, "bad configuration", phrase)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config, override, phrase", [
    ("analyze", "note=a (b)", "Error parsing override 'note=a (b)'"),
    ("evaluate", "trainer", "Error parsing override 'trainer'"),
    ("synth", "no_such_key=1", "no_such_key"),
])
def test_check_overrides_is_one_line_and_exit_2_for_every_config(capsys, config, override, phrase):
    """The same check as above, in-process, for the other entry points' configs (each of their
    ``__main__`` blocks calls ``cli.check_overrides`` with its config name)."""
    cli.check_overrides(config, [])  # the shipped config composes
    with pytest.raises(SystemExit) as exit_info:
        cli.check_overrides(config, [override])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: bad configuration") and phrase in errors[0]


def test_analyze_cli_without_input_exits_2(tmp_path):
    result = _run_module("radlogics_repro.analyze", ["input=", f"output_dir={tmp_path / 'out'}"],
                         cwd=tmp_path)
    _assert_one_line_exit_2(result, "input: missing; usage: python -m radlogics_repro.analyze")
    assert {p.name for p in (tmp_path / "out").iterdir()} <= {"logs"}


# =============================================================================================
# Analysis: a batch with broken studies, no lung in view, privacy, paths
# =============================================================================================


@pytest.fixture(scope="module")
def analysis_models(tiny_models):
    from radlogics_repro import analyze

    return analyze.load_analysis_models(str(tiny_models["lung"]), str(tiny_models["classifier"]))


def _settings():
    from radlogics_repro import analyze

    return analyze.AnalysisSettings(batch_size=8, n_overlays=1)


def _every_readable_text(path: Path) -> list[bytes]:
    """What a reader of ``path`` can see: its bytes, gunzipped bytes and PNG text chunks."""
    raw = path.read_bytes()
    parts = [raw]
    if path.name.endswith(".gz"):
        parts.append(gzip.decompress(raw))
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            parts.append(repr({**image.info, **getattr(image, "text", {})}).encode())
    return parts


def _assert_no_identity(folder: Path, extra_text: str, uids: list[str]) -> int:
    words = {w for value in SECRETS.values() for w in re.split(r"[\^ ]", value) if len(w) >= 5}
    secrets = [*SECRETS.values(), *sorted(words), *uids]
    scanned = 0
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            for part in _every_readable_text(file):
                for secret in secrets:
                    assert secret.encode() not in part, (file, secret)
            scanned += 1
    for secret in secrets:
        assert secret not in extra_text, secret
    return scanned


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """A manifest of six studies: three good ones (one without HU rescale), three broken."""
    root = tmp_path_factory.mktemp("batch_inputs").resolve()
    good = _dicom(root / "dicom_good")
    truncated = _dicom(root / "dicom_truncated", seed=1)
    truncated[5].write_bytes(truncated[5].read_bytes()[:900])
    _dicom(root / "single", hu=_chest(n=1), seed=2)
    _dicom(root / "no_rescale", seed=3, RescaleIntercept="0")  # stored values, not HU
    study = io.study_from_array(_chest(n=10), SPACING)
    io.save_volume(study, study.hu, root / "nifti_good.nii.gz", dtype=np.int16)
    rows = [("c-dicom", "dicom_good", "P1", 0), ("", "nifti_good.nii.gz", "P1", 4),
            ("c-truncated", "dicom_truncated", "P2", 0), ("c-missing", "missing.nii.gz", "P2", 3),
            ("c-single", "single", "P3", 0), ("c-norescale", "no_rescale", "P3", 2)]
    manifest = root / "manifest.csv"
    pd.DataFrame(rows, columns=["case_id", "image", "patient_id", "day"]).to_csv(manifest, index=False)
    uids = [str(pydicom.dcmread(good[0]).StudyInstanceUID), str(pydicom.dcmread(good[0]).SeriesInstanceUID)]
    return manifest, truncated[5], uids


def test_batch_reports_bad_studies_goes_on_and_leaks_nothing(analysis_models, batch_inputs, tmp_path,
                                                             caplog, capsys):
    from radlogics_repro import analyze

    manifest, truncated_file, uids = batch_inputs
    root = manifest.parent
    out = tmp_path / "analysis"
    with caplog.at_level(logging.DEBUG, logger="radlogics_repro"):
        summary = analyze.run_batch(analyze.discover_inputs(manifest), analysis_models, _settings(),
                                    out, progress=False)
    status = dict(zip(summary["case_id"], summary["status"], strict=True))
    errors = dict(zip(summary["case_id"], summary["error"].fillna(""), strict=True))
    hashed = [c for c in status if c.startswith("case-")]
    assert len(hashed) == 1  # the NIfTI row without a case_id gets a pseudonymous hash id
    assert status == {"c-dicom": "ok", hashed[0]: "ok", "c-truncated": "error",
                      "c-missing": "error", "c-single": "error", "c-norescale": "ok"}
    assert errors["c-truncated"].startswith(f"{truncated_file}: not a DICOM file (truncated or corrupt")
    assert errors["c-missing"] == f"{root / 'missing.nii.gz'}: does not exist"
    assert errors["c-single"] == (f"{root / 'single'}: single slice (1 image); a volume of at least 2 "
                                  "slices is needed")
    assert all("\n" not in e for e in errors.values())
    # outputs: one complete folder per good study, nothing for the bad ones, no temporary leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["c-dicom", hashed[0], "c-norescale", "summary.csv", "longitudinal"])
    for case in ("c-dicom", hashed[0], "c-norescale"):
        assert {"report.json", "slices.csv", "lung_mask.nii.gz", "report.html"} <= {
            p.name for p in (out / case).iterdir()}
    assert len(pd.read_csv(out / "summary.csv")) == 6
    assert sorted(p.name for p in (out / "longitudinal").iterdir()) == ["P1.csv", "P1.png"]
    # wrong rescale: analysed, with the documented warning carried into the report
    warnings = json.loads((out / "c-norescale" / "report.json").read_text())["input"]["warnings"]
    assert any("has no air" in w and "missing RescaleIntercept" in w for w in warnings)
    # privacy: every output byte (gunzipped NIfTI, PNG text chunks, CSV, JSON, HTML) and every log line
    logs = "\n".join(r.getMessage() for r in caplog.records) + capsys.readouterr().out
    assert _assert_no_identity(out, logs, uids) >= 15
    # a rerun does not redo or overwrite finished studies and still reports the broken ones
    before = (out / "c-dicom" / "report.json").stat().st_mtime_ns
    again = analyze.run_batch(analyze.discover_inputs(manifest), analysis_models, _settings(), out,
                              progress=False)
    assert sorted(again["status"]) == ["done earlier"] * 3 + ["error"] * 3
    assert (out / "c-dicom" / "report.json").stat().st_mtime_ns == before


def test_manifest_case_id_cannot_escape_the_output_folder(analysis_models, tmp_path):
    from radlogics_repro import analyze

    study = io.study_from_array(_chest(n=6), SPACING)
    io.save_volume(study, study.hu, tmp_path / "s.nii.gz", dtype=np.int16)
    out = tmp_path / "a" / "b" / "analysis"
    inputs = pd.DataFrame({"case_id": ["../../escaped"], "image": [str(tmp_path / "s.nii.gz")]})
    try:
        summary = analyze.run_batch(inputs, analysis_models, _settings(), out, progress=False)
    finally:
        escaped = (tmp_path / "a" / "escaped").exists()
    assert not escaped, "an output folder was written outside output_dir"
    assert summary["status"].iloc[0] == "error" and "case_id" in summary["error"].iloc[0]


@pytest.fixture(scope="module")
def abdomen_analysis(tiny_models, tmp_path_factory):
    """The abdomen (no lung in view) analysed with the tiny classifier and the tiny lung U-Net
    whose output layer is set to 'no lung anywhere' (an untrained U-Net's answer is random)."""
    from radlogics_repro import analyze, models

    folder = tmp_path_factory.mktemp("abdomen")
    lung = models.load_model(tiny_models["lung"])
    head = lung.get_layer("lung_mask")
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.full_like(bias, -30.0)])  # sigmoid(-30) ~ 1e-13
    (folder / "lung").mkdir()
    lung.save(folder / "lung" / "model.keras")
    (folder / "lung" / "model.json").write_text((tiny_models["lung"].parent / "model.json").read_text())
    loaded = analyze.load_analysis_models(str(folder / "lung" / "model.keras"),
                                          str(tiny_models["classifier"]))
    study = io.study_from_array(_abdomen(), SPACING)
    source = io.save_volume(study, study.hu, folder / "abdomen.nii.gz", dtype=np.int16)
    study = load_study(source)
    report = analyze.analyze_study(study, loaded, _settings(), case_id="abdomen")
    return study, report, loaded


def test_study_without_lungs_in_view_is_analysed_as_no_lung(abdomen_analysis):
    study, report, _ = abdomen_analysis
    assert study.metadata["warnings"] == []  # air around the body: calibrated HU, no io warning
    decision = report.summary["decision"]
    assert decision["lung_slices"] == 0 and decision["positive_slices"] == 0
    assert decision["suspected_covid"] is False and decision["positive_slice_ratio"] == 0.0
    assert report.summary["corona_score_cm3"] == 0.0
    assert report.summary["volumes"]["lung_ml"]["total"] == 0.0
    assert report.summary["volumes"]["lung_involvement_percent"] == 0.0
    assert not report.lung_labels.any() and not report.infection_labels.any()
    assert "no lung found" in report.summary["warnings"][0]


def test_a_failure_while_writing_outputs_leaves_no_folder(abdomen_analysis, tmp_path, monkeypatch):
    from radlogics_repro import analyze, report

    study, result, loaded = abdomen_analysis
    out = tmp_path / "analysis" / "abdomen"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(report, "write_html_report", disk_full)
        with pytest.raises(OSError, match="No space left"):
            analyze.write_study_outputs(result, study, loaded, _settings(), out)
    assert list((tmp_path / "analysis").iterdir()) == []
    analyze.write_study_outputs(result, study, loaded, _settings(), out)
    document = json.loads((out / "report.json").read_text())
    assert document["decision"]["lung_slices"] == 0 and document["corona_score_cm3"] == 0.0
    assert "not a chest CT" in document["warnings"][0]
    assert not any(p.name.startswith("overlay_") for p in out.iterdir())  # nothing to overlay


# =============================================================================================
# Repeatability
# =============================================================================================


@pytest.fixture
def op_determinism_restored():
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    yield
    if not was:
        tf_config.disable_op_determinism()


def _numbers(tree, prefix=""):
    """Flatten the numeric leaves of a JSON tree into {path: float}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{prefix}/{i}").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: float(tree)}
    return {}


@pytest.mark.parametrize("experiment, model_override", [
    ("lung_unet", "model.decoder_filters=[8,8,8,8]"),
    # the ResNet-50 smoke run takes about 100 s per run on a busy 2-core CPU
    pytest.param("classifier", "model.dense_units=[8,4]", marks=pytest.mark.slow),
])
def test_deterministic_smoke_runs_give_the_same_metrics(experiment, model_override, tiny_dataset,
                                                        tmp_path, op_determinism_restored, monkeypatch):
    """Two ``trainer.deterministic=true`` runs, the second killed after its first epoch and resumed
    (mid warm-up/cosine schedule): same history and metrics within 1e-6 (absolute) -- repeatable,
    and a resumed run ends where an uninterrupted one does."""
    from radlogics_repro import train

    original = train.ResumeCheckpoint.on_epoch_end

    def killed_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt("simulated kill")

    runs = []
    for name in ("first", "second"):
        cfg = _compose("train", [
            f"+experiment={experiment}", "trainer=smoke", f"data.manifest={tiny_dataset}",
            "data.generate_if_missing=false", "data.input_size=32", "model.weights=null",
            model_override, "trainer.deterministic=true", "trainer.lr_schedule=cosine",
            "trainer.warmup_epochs=1", f"run_dir={tmp_path / name}"])
        cli.check_config(cfg, cli.TRAIN_CONFIG_RULES)
        if name == "second":
            monkeypatch.setattr(train.ResumeCheckpoint, "on_epoch_end", killed_after_first_epoch)
            with pytest.raises(KeyboardInterrupt):
                train.train(cfg)
            state = json.loads((tmp_path / name / "resume" / "state.json").read_text())
            assert state["epoch"] == 1 and not (tmp_path / name / "metrics.json").exists()
            monkeypatch.setattr(train.ResumeCheckpoint, "on_epoch_end", original)
        train.train(cfg)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        history = pd.read_csv(tmp_path / name / "history.csv")
        runs.append((_numbers({k: metrics[k] for k in ("metrics", "operating_threshold",
                                                         "case_threshold", "slices")}), history))
    (first, history_a), (second, history_b) = runs
    assert first.keys() == second.keys() and len(first) > 5
    for key in first:
        np.testing.assert_allclose(second[key], first[key], atol=1e-6, equal_nan=True, err_msg=key)
    assert list(history_a.columns) == list(history_b.columns) and len(history_a) == 2
    np.testing.assert_allclose(history_b.to_numpy(float), history_a.to_numpy(float), atol=1e-6)


def test_an_unexpected_error_in_one_study_does_not_end_the_batch(abdomen_analysis, tmp_path,
                                                                 monkeypatch):
    from radlogics_repro import analyze

    study, _, loaded = abdomen_analysis
    io.save_volume(study, study.hu, tmp_path / "a.nii.gz", dtype=np.int16)
    io.save_volume(study, study.hu, tmp_path / "b.nii.gz", dtype=np.int16)
    inputs = pd.DataFrame({"case_id": ["a", "b"], "image": [str(tmp_path / "a.nii.gz"),
                                                            str(tmp_path / "b.nii.gz")]})
    original = analyze.analyze_study

    def fails_on_a(study, models, settings, case_id=None):
        if case_id == "a":
            raise ValueError("a library bug")
        return original(study, models, settings, case_id=case_id)

    monkeypatch.setattr(analyze, "analyze_study", fails_on_a)
    summary = analyze.run_batch(inputs, loaded, _settings(), tmp_path / "out", progress=False)
    assert list(summary["status"]) == ["error", "ok"]
    assert "a.nii.gz: ValueError: a library bug" in summary["error"].iloc[0]
    assert not (tmp_path / "out" / "a").exists() and (tmp_path / "out" / "b" / "report.json").exists()


# =============================================================================================
# An enormous study
# =============================================================================================

_ENORMOUS_STUDY_SCRIPT = """
import json, resource, sys
import numpy as np
from radlogics_repro import analyze, io, synth
lung, classifier, out = sys.argv[1:4]
case = synth.generate_case(3, label=1, in_plane=256, n_slices=100)
study = io.study_from_array(np.tile(case.hu, (10, 1, 1)), (1.0, 1.4, 1.4))
del case
models = analyze.load_analysis_models(lung, classifier)
settings = analyze.AnalysisSettings()
report = analyze.analyze_study(study, models, settings, case_id="enormous")
analyze.write_study_outputs(report, study, models, settings, out)
# VmHWM is this process's own peak; on Linux ru_maxrss also keeps the peak of the process it was
# exec'd from (here the pytest process, GBs after earlier tests), which is not the analysis's.
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak_kib = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"slices": int(study.hu.shape[0]), "lung_slices": report.summary["decision"]["lung_slices"],
                  "peak_rss_gb": peak_kib / 1024**2}))
"""


def test_a_1000_slice_study_is_analysed_in_batches_under_4_gb(tiny_models, tmp_path):
    """1,000 slices (256 x 256 here, to keep the default run short; the 512 x 512 figure is in
    results/reliability.md) analysed end to end in its own process: peak RSS < 4 GB."""
    result = subprocess.run(
        [sys.executable, "-c", _ENORMOUS_STUDY_SCRIPT, str(tiny_models["lung"]),
         str(tiny_models["classifier"]), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["slices"] == 1000 and measured["lung_slices"] > 0
    assert measured["peak_rss_gb"] < 4.0, measured
    assert (tmp_path / "out" / "report.json").exists()
