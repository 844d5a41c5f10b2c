"""Synthetic phantoms (radlogics_repro.synth): HU per tissue, ground truth, determinism, breathing,
longitudinal course, confounders, the dataset writer and the Hydra CLI. Tiny grids throughout."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radlogics_repro.synth import (
    CONSOLIDATION,
    GGO,
    LUNG_LEFT,
    LUNG_RIGHT,
    MANIFEST_COLUMNS,
    TISSUE,
    SynthError,
    generate_case,
    generate_dataset,
)
from radlogics_repro.synth import lesions as les
from radlogics_repro.synth import phantom as ph
from radlogics_repro.synth.dataset import assign_splits, plan_patients
from radlogics_repro.synth.geometry import Breath, Grid

REPO = Path(__file__).resolve().parents[1]
TINY = {"in_plane": 64, "n_slices": 24}


def _covid_seed_with_consolidation() -> int:
    """A COVID seed whose lesions have consolidation cores near the peak."""
    for seed in range(3, 40):
        pat = ph._patient(seed, (0.6, 0.9), True, True)
        if any(s.cons_max > 0 for s in pat.disease.seeds) and len(pat.disease.seeds) >= 3:
            return seed
    raise AssertionError("no seed with consolidation")


@pytest.fixture(scope="module")
def covid_clean():
    seed = _covid_seed_with_consolidation()
    return generate_case(seed, label=1, day=9, longitudinal=True, breath_phase="inhale",
                         in_plane=128, n_slices=64, noise=False, tissue=True)


@pytest.fixture(scope="module")
def negative_clean():
    return generate_case(2, label=0, breath_phase="inhale", in_plane=96, n_slices=40,
                         noise=False, tissue=True)


# ---------------------------------------------------------------------------------------------
# HU per tissue
# ---------------------------------------------------------------------------------------------


def _hu(case, name):
    return case.hu[case.tissue == TISSUE[name]]


def test_tissue_hu_ranges_before_noise(negative_clean):
    c = negative_clean
    lung = _hu(c, "lung")
    assert -910 <= np.median(lung) <= -830  # parenchyma, vessels are a small minority
    fat = _hu(c, "fat")
    assert -110 <= np.median(fat) <= -75
    assert np.percentile(fat, 10) >= -130 and np.percentile(fat, 90) <= -40
    soft = _hu(c, "soft")
    assert 20 <= np.median(soft) <= 70
    bone = _hu(c, "bone")
    assert np.percentile(bone, 5) >= 300 and np.percentile(bone, 95) <= 1200
    blood = _hu(c, "blood")
    assert 30 <= np.median(blood) <= 55
    inside_fov = (c.tissue == TISSUE["air"]) & (c.hu > -1500)
    assert np.mean(c.hu[inside_fov] == -1000) > 0.99  # the rest: partial volume of cables


def test_noise_level_and_air_outside(negative_clean):
    noisy = generate_case(2, label=0, breath_phase="inhale", in_plane=96, n_slices=40,
                          tissue=True)
    sigma = noisy.info["scanner"]["noise_hu"]
    assert 10 <= sigma <= 40
    air = (noisy.tissue == TISSUE["air"]) & (noisy.hu > -1500)
    assert abs(noisy.hu[air].mean() + 1000) < 10
    # uniform muscle/fat far from edges: the residual std is of the order of the profile
    diff = noisy.hu - negative_clean.hu
    sel = (negative_clean.tissue == TISSUE["fat"]) & (np.abs(diff) < 300)
    assert 0.4 * sigma < diff[sel].std() < 2.0 * sigma + 5
    lung = noisy.hu[noisy.lung_mask > 0]
    assert -920 <= np.median(lung) <= -820


def test_lesion_hu_before_noise(covid_clean):
    c = covid_clean
    ggo = c.hu[c.lesion_mask == GGO]
    cons = c.hu[c.lesion_mask == CONSOLIDATION]
    assert ggo.size > 50 and cons.size > 10
    assert -750 <= np.median(ggo) <= -350
    assert np.mean((ggo >= -760) & (ggo <= -200)) > 0.8  # crazy-paving septa and vessels above
    assert -150 <= np.median(cons) <= 50
    assert np.mean((cons >= -300) & (cons <= 60)) > 0.8


def test_gravity_gradient_denser_posteriorly(negative_clean):
    c = negative_clean
    lung = (c.tissue == TISSUE["lung"]) & (c.hu < -700)  # parenchyma, not vessels
    rows = np.nonzero(lung)[1]
    lo, hi = np.percentile(rows, [20, 80])
    ant = c.hu[lung & (np.arange(c.hu.shape[1])[None, :, None] <= lo)]
    post = c.hu[lung & (np.arange(c.hu.shape[1])[None, :, None] >= hi)]
    assert np.mean(post) > np.mean(ant) + 5


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def test_volumes_match_masks(covid_clean):
    c = covid_clean
    vox = float(np.prod(c.spacing)) / 1000.0
    assert c.lesion_volume_cm3 == pytest.approx(np.count_nonzero(c.lesion_mask) * vox)
    assert c.ggo_volume_cm3 == pytest.approx(np.count_nonzero(c.lesion_mask == GGO) * vox)
    assert c.consolidation_volume_cm3 == pytest.approx(
        np.count_nonzero(c.lesion_mask == CONSOLIDATION) * vox)
    assert c.lung_volume_right_ml == pytest.approx(np.count_nonzero(c.lung_mask == 1) * vox)
    assert c.lung_volume_left_ml == pytest.approx(np.count_nonzero(c.lung_mask == 2) * vox)
    assert c.lung_volume_ml == pytest.approx(c.lung_volume_right_ml + c.lung_volume_left_ml)
    assert 1500 < c.lung_volume_ml < 9000
    assert c.hu.dtype == np.float32 and c.lung_mask.dtype == np.uint8
    assert c.lesion_mask.dtype == np.uint8
    assert set(np.unique(c.lesion_mask)) <= {0, GGO, CONSOLIDATION}


def test_lesions_strictly_inside_lungs(covid_clean):
    c = covid_clean
    assert c.label == 1 and np.count_nonzero(c.lesion_mask) > 0
    assert not np.any((c.lesion_mask > 0) & (c.lung_mask == 0))


def test_lesions_peripheral_posterior_lower_bilateral():
    from scipy import ndimage as ndi

    post = low = depth_les = depth_lung = 0.0
    bilateral = 0
    seeds = range(60, 68)
    for seed in seeds:
        c = generate_case(seed, label=1, day=9, longitudinal=True, breath_phase="inhale",
                          in_plane=64, n_slices=32, noise=False)
        lesion, lung = c.lesion_mask > 0, c.lung_mask > 0
        zl, yl, _ = np.nonzero(lung)
        zs, ys, _ = np.nonzero(lesion)
        post += np.mean(ys > np.median(yl)) / len(seeds)
        low += np.mean(zs < np.median(zl)) / len(seeds)
        depth = ndi.distance_transform_edt(lung, sampling=c.spacing)
        depth_les += depth[lesion].mean() / len(seeds)
        depth_lung += depth[lung].mean() / len(seeds)
        bilateral += set(np.unique(c.lung_mask[lesion]).tolist()) == {LUNG_RIGHT, LUNG_LEFT}
    assert post > 0.6 and low > 0.6  # posterior and lower-zone predominance
    assert depth_les < 0.85 * depth_lung  # peripheral / subpleural (uniform placement: ~1)
    assert bilateral >= len(seeds) // 2


def test_lung_labels_right_is_low_x(negative_clean):
    lung = negative_clean.lung_mask
    assert set(np.unique(lung).tolist()) == {0, LUNG_RIGHT, LUNG_LEFT}
    x_right = np.nonzero(lung == LUNG_RIGHT)[2]
    x_left = np.nonzero(lung == LUNG_LEFT)[2]
    nx = lung.shape[2]
    assert x_right.mean() < nx / 2 < x_left.mean()
    assert np.mean(x_right < nx / 2) > 0.95 and np.mean(x_left > nx / 2) > 0.95


def test_canonical_orientation(negative_clean):
    """Slice 0 is inferior (liver, no apex), high y is posterior (spine and table)."""
    c = negative_clean
    per_slice = np.count_nonzero(c.lung_mask.reshape(len(c.hu), -1), axis=1)
    assert per_slice[0] == 0 and per_slice[-1] == 0
    assert np.argmax(per_slice) < len(per_slice) * 0.75
    bone_rows = np.nonzero(c.tissue == TISSUE["bone"])[1]
    lung_rows = np.nonzero(c.lung_mask)[1]
    assert np.median(bone_rows) > np.median(lung_rows) - 5  # spine behind the lung centre
    organ_z = np.nonzero(c.tissue == TISSUE["organ"])[0]
    assert np.median(organ_z) < np.median(np.nonzero(c.lung_mask)[0])


def test_origin_and_spacing_are_consistent(negative_clean):
    c = negative_clean
    assert len(c.spacing) == 3 and len(c.origin_lps) == 3
    assert c.spacing[1] == pytest.approx(c.spacing[2])
    assert c.spacing[1] == pytest.approx(c.info["fov_mm"] / 96, rel=1e-3)
    extent = (c.hu.shape[0] - 1) * c.spacing[0]
    assert 200 < extent < 420  # apex to below the lung bases


# ---------------------------------------------------------------------------------------------
# Determinism, breathing, time course, confounders
# ---------------------------------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs():
    a = generate_case(11, **TINY)
    b = generate_case(11, **TINY, threads=1)
    c = generate_case(12, **TINY)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert a.spacing == b.spacing and a.origin_lps == b.origin_lps
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_hu_are_integers_within_ct_range():
    c = generate_case(13, **TINY)
    assert np.array_equal(c.hu, np.rint(c.hu))
    inside = c.hu > -1500
    assert c.hu[inside].min() >= -1024 and c.hu.max() <= 3071


def test_exhalation_shrinks_lungs_30_to_50_percent():
    kw = {"in_plane": 96, "n_slices": 64, "noise": False}
    for seed in (21, 22):
        inh = generate_case(seed, breath_phase="inhale", **kw)
        exh = generate_case(seed, breath_phase="exhale", **kw)
        ratio = exh.lung_volume_ml / inh.lung_volume_ml
        assert 0.5 <= ratio <= 0.7, (seed, ratio)
        assert exh.breath_phase == "exhale" and inh.breath_phase == "inhale"
        # the diaphragm rises: the lungs span fewer millimetres cranio-caudally
        def height(c):
            z = np.nonzero(c.lung_mask.any(axis=(1, 2)))[0]
            return (z[-1] - z[0]) * c.spacing[0]
        assert height(exh) < 0.85 * height(inh)
        # denser parenchyma at expiration
        assert np.median(exh.hu[exh.lung_mask > 0]) > np.median(inh.hu[inh.lung_mask > 0]) + 40


def test_longitudinal_burden_rises_then_falls():
    days = [0, 5, 10, 15, 25]
    for seed in (31, 32, 33):
        burden = [generate_case(seed, label=1, day=d, longitudinal=True, breath_phase="inhale",
                                noise=False, **TINY).lesion_volume_cm3 for d in days]
        peak = max(burden[1:-1])
        assert peak > burden[0] and peak > burden[-1], (seed, burden)
        assert burden[-1] > 0  # residual opacities remain


def test_same_patient_same_anatomy_across_days():
    a = generate_case(41, label=1, day=0, longitudinal=True, breath_phase="inhale", noise=False,
                      **TINY)
    b = generate_case(41, label=1, day=15, longitudinal=True, breath_phase="inhale", noise=False,
                      **TINY)
    # same lungs up to the small repositioning between scans
    assert b.lung_volume_ml == pytest.approx(a.lung_volume_ml, rel=0.08)
    assert a.case_id.endswith("_d000") and b.case_id.endswith("_d015")


def test_negatives_have_no_lesions_but_confounders(monkeypatch):
    for seed in range(50, 60):
        case = generate_case(seed, label=0, **TINY)
        assert case.label == 0
        assert not case.lesion_mask.any()
        assert case.info["confounders"], seed
    # the confounders change the lungs (only): render with and without them
    kw = {"label": 0, "breath_phase": "inhale", "noise": False, "in_plane": 96, "n_slices": 48}
    with_conf = generate_case(2, **kw)
    ph._patient.cache_clear()
    monkeypatch.setattr(les, "sample_confounders",
                        lambda *a, **k: les.Confounders([], None, False, []))
    without = generate_case(2, **kw)
    ph._patient.cache_clear()
    changed = with_conf.hu != without.hu
    assert changed.sum() > 20
    assert np.all(with_conf.lung_mask[changed] > 0)
    assert np.array_equal(with_conf.lung_mask, without.lung_mask)


def test_confounder_blobs_render_in_lung_only():
    grid = Grid((20, 40, 40), (2.0, 1.0, 1.0), (-20.0, -20.0, -20.0))
    hu = np.full(grid.shape, -870.0, np.float32)
    lung = np.zeros(grid.shape, np.uint8)
    lung[:, :, :30] = 1
    nodule = les.Blob("nodule", np.array([0.0, 0.0, 0.0]), np.array([5.0, 5.0, 5.0]), np.eye(3),
                      np.zeros((0, 3)), np.zeros(0), np.zeros(0), edge=0.1, hu=40.0)
    hole = les.Blob("hole", np.array([-12.0, 10.0, 6.0]), np.array([3.0, 3.0, 3.0]), np.eye(3),
                    np.zeros((0, 3)), np.zeros(0), np.zeros(0), edge=0.1, hu=-990.0)
    edge = les.Blob("nodule", np.array([12.0, 0.0, 0.0]), np.array([4.0, 4.0, 4.0]), np.eye(3),
                    np.zeros((0, 3)), np.zeros(0), np.zeros(0), edge=0.1, hu=40.0)
    conf = les.Confounders([nodule, hole, edge], None, False, ["nodules", "emphysema"])
    les.render_confounders(hu, lung, conf, Breath.inhale(100.0), grid)
    assert hu[10, 20, 20] == pytest.approx(40.0)  # nodule centre (X=0, Y=0, Z=0)
    assert hu[13, 30, 8] == pytest.approx(-990.0)  # hole centre (X=-12, Y=10, Z=6)
    assert np.all(hu[:, :, 30:] == -870.0)  # outside the lung mask nothing changes
    assert hu.min() >= -990.0 and hu.max() <= 40.0


def test_bad_arguments_raise_synth_error():
    with pytest.raises(SynthError, match="breath_phase"):
        generate_case(1, breath_phase="deep", **TINY)
    with pytest.raises(SynthError, match="in_plane"):
        generate_case(1, in_plane=4, n_slices=8)
    with pytest.raises(SynthError, match="slice_mm"):
        generate_case(1, in_plane=32, slice_mm=(3.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Dataset writer
# ---------------------------------------------------------------------------------------------

DS = {"n_patients": 4, "seed": 5, "in_plane": 40, "slices": 12, "longitudinal_fraction": 0.25,
      "timepoints": 3, "progress": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    manifest = generate_dataset(out, formats=("nifti", "dicom"), **DS)
    return out, manifest


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dataset_layout_and_manifest(dataset):
    out, manifest = dataset
    assert manifest == out / "manifest.csv"
    rows = _rows(manifest)
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert len(rows) == 3 + 3  # one longitudinal patient with 3 scans, three single scans
    for r in rows:
        for col in ("image", "lung_mask", "lesion_mask", "dicom"):
            assert not Path(r[col]).is_absolute() and (out / r[col]).exists()
        assert r["case_id"] == f"{r['patient_id']}_d{int(r['day']):03d}"
        assert r["patient_id"].startswith("P") and r["breath_phase"] in ("inhale", "exhale")
        assert int(r["label"]) in (0, 1)
    assert {int(r["label"]) for r in rows} == {0, 1}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["seed"] == 5 and meta["parameters"]["n_patients"] == 4
    assert not any(p.name.startswith(".ds.tmp") for p in out.parent.iterdir())


def test_splits_by_patient_and_stratified(dataset):
    rows = _rows(dataset[1])
    per_patient = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_patient.values())
    ids = [f"P{i:04d}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    splits = assign_splits(ids, labels, (0.6, 0.2, 0.2), seed=3)
    assert splits == assign_splits(ids, labels, (0.6, 0.2, 0.2), seed=3)
    for lab in (0, 1):
        counts = [sum(1 for i, s in zip(ids, labels, strict=True)
                      if s == lab and splits[i] == name) for name in ("train", "val", "test")]
        assert counts == [12, 4, 4]
    plan = plan_patients(n_patients=10, seed=1, covid_fraction=0.5, longitudinal_fraction=0.3,
                         timepoints=(3, 5), split_fractions=(0.6, 0.2, 0.2))
    assert sum(p["label"] for p in plan) == 5 and sum(p["longitudinal"] for p in plan) == 3
    assert all(p["days"][0] == 0 and 3 <= len(p["days"]) <= 5 for p in plan if p["longitudinal"])


def test_nifti_reads_back_the_generated_case(dataset):
    from radlogics_repro import io

    out, manifest = dataset
    meta = json.loads((out / "dataset.json").read_text())
    row = next(r for r in _rows(manifest) if int(r["label"]) == 1)
    info = meta["cases"][row["case_id"]]
    patient = next(p for p in meta["patients"] if p["patient_id"] == row["patient_id"])
    case = generate_case(info["seed"], day=int(row["day"]), label=1,
                         breath_phase=row["breath_phase"], patient_id=row["patient_id"],
                         in_plane=40, n_slices=12, longitudinal=patient["longitudinal"])
    study = io.load_study(out / row["image"])
    assert study.hu.shape == case.hu.shape
    np.testing.assert_array_equal(study.hu, np.clip(np.rint(case.hu), -32768, 32767))
    np.testing.assert_allclose(study.spacing, case.spacing, rtol=1e-5)
    lesion = io.load_mask(out / row["lesion_mask"], study)
    np.testing.assert_array_equal(lesion, case.lesion_mask)
    assert float(row["lesion_volume_cm3"]) == pytest.approx(case.lesion_volume_cm3, abs=1e-3)


def test_dicom_matches_nifti_and_hides_the_planted_identity(dataset):
    import pydicom

    from radlogics_repro import io

    out, manifest = dataset
    row = _rows(manifest)[0]
    nifti = io.load_study(out / row["image"])
    dicom = io.load_study(out / row["dicom"])
    assert dicom.hu.shape == nifti.hu.shape
    assert np.max(np.abs(dicom.hu - nifti.hu)) <= 1.0
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-3)
    ds = pydicom.dcmread(sorted((out / row["dicom"]).glob("*.dcm"))[0])
    name, pid, birth = str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)
    assert name.startswith("SYNTH^") and pid.startswith("SYN-ID-") and len(birth) == 8
    for f in ("manifest.csv", "slices.csv", "dataset.json"):
        text = (out / f).read_text()
        assert name not in text and pid not in text and birth not in text


def test_slices_csv_matches_preprocess_labels(dataset):
    from radlogics_repro import io, preprocess

    out, manifest = dataset
    slices = _rows(out / "slices.csv")
    for row in _rows(manifest):
        mine = [s for s in slices if s["case_id"] == row["case_id"]]
        study = io.load_study(out / row["image"])
        lesion = io.load_mask(out / row["lesion_mask"], study)
        expected = preprocess.abnormal_slice_labels(lesion, study.pixel_area_mm2, 25.0)
        assert [int(s["abnormal"]) for s in mine] == [int(v) for v in expected]
        assert [int(s["z"]) for s in mine] == list(range(study.hu.shape[0]))


def test_refuses_to_overwrite_and_leaves_no_half_dataset(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    small = {**DS, "n_patients": 2, "longitudinal_fraction": 0.0, "in_plane": 32, "slices": 8}
    generate_dataset(out, **small)
    before = (out / "manifest.csv").read_text()
    with pytest.raises(SynthError, match="overwrite") as err:
        generate_dataset(out, **small)
    assert "\n" not in str(err.value)
    generate_dataset(out, **{**small, "seed": 6}, overwrite=True)
    assert (out / "manifest.csv").read_text() != before

    from radlogics_repro.synth import dataset as dsmod

    calls = []

    def failing(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return generate_case(*args, **kwargs)

    monkeypatch.setattr(dsmod, "generate_case", failing)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(fresh, **small)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_site_scanner_fixes_kernel_and_noise_and_leaves_the_usual_draw_alone():
    usual = generate_case(5, label=0, breath_phase="inhale", in_plane=48, n_slices=8)
    site = {"kernel": "sharp", "noise_hu": (100.0, 110.0), "blur_mm": None}
    at_site = generate_case(5, label=0, breath_phase="inhale", in_plane=48, n_slices=8, scanner=site)
    profile = at_site.info["scanner"]
    assert profile["kernel"] == "sharp" and 100.0 <= profile["noise_hu"] <= 110.0
    assert 0.3 <= profile["blur_mm"] <= 0.45            # the sharp kernel's own blur range
    assert np.array_equal(at_site.lung_mask, usual.lung_mask)   # same patient, same geometry
    again = generate_case(5, label=0, breath_phase="inhale", in_plane=48, n_slices=8, scanner={})
    assert again.info["scanner"] == usual.info["scanner"] and np.array_equal(again.hu, usual.hu)


@pytest.mark.parametrize("site, message", [
    ({"kernel": "blurry"}, "scanner.kernel"),
    ({"noise_hu": (50.0, 20.0)}, "scanner.noise_hu"),
    ({"noise_hu": "loud"}, "scanner.noise_hu"),
    ({"dose": 1.0}, "unknown key"),
])
def test_bad_site_scanner_is_refused_before_writing(tmp_path, site, message):
    with pytest.raises(SynthError, match=message):
        generate_dataset(tmp_path / "ds", n_patients=1, scanner=site)
    assert not (tmp_path / "ds").exists()


def test_bad_dataset_arguments():
    with pytest.raises(SynthError, match="n_patients"):
        generate_dataset("/nonexistent/never", n_patients=0)
    with pytest.raises(SynthError, match="formats"):
        generate_dataset("/nonexistent/never", formats=("png",))
    with pytest.raises(SynthError, match="split_fractions"):
        generate_dataset("/nonexistent/never", split_fractions=(1.0, 0.0))


def test_ensure_dataset_refuses_a_cached_dataset_made_with_other_settings(dataset):
    from radlogics_repro.synth import ensure_dataset

    out, manifest = dataset
    same = {**DS, "formats": ["nifti", "dicom"], "min_lesion_area_mm2": None, "scanner": None}
    assert ensure_dataset(manifest, same) == manifest            # defaults and None match
    assert ensure_dataset(manifest, {"n_patients": 4, "in_plane": 40.0}) == manifest
    with pytest.raises(SynthError) as err:
        ensure_dataset(manifest, {**DS, "n_patients": 7, "split_fractions": [0.5, 0.5, 0.0]})
    message = str(err.value)
    assert str(out / "dataset.json") in message and "n_patients=4 (asked: 7)" in message
    assert "split_fractions=[0.6, 0.2, 0.2] (asked: [0.5, 0.5, 0.0])" in message
    assert "\n" not in message and "seed" not in message


# ---------------------------------------------------------------------------------------------
# Hydra CLI
# ---------------------------------------------------------------------------------------------


def test_hydra_config_composes_into_generator_arguments(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    out = tmp_path / "ds"
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("synth", overrides=[f"out_dir={out}", "n_patients=2", "in_plane=32",
                                          "slices=8", "longitudinal_fraction=0"],
                      return_hydra_config=True)
    assert str(cfg.hydra.run.dir).startswith("outputs/synth/")
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("synth", overrides=[f"out_dir={out}", "n_patients=2", "in_plane=32",
                                          "slices=8", "longitudinal_fraction=0"])
    args = OmegaConf.to_container(cfg, resolve=True)
    manifest = generate_dataset(args.pop("out_dir"), progress=False, **args)
    assert manifest == out / "manifest.csv" and len(_rows(manifest)) == 2
    with initialize_config_module(config_module="conf", version_base="1.3"):
        default = compose("synth")
    assert str(default.out_dir).endswith("synthetic/default")
    assert 16 <= default.n_patients <= 40


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "radlogics_repro.synth", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_subprocess_writes_dataset(tmp_path):
    out = tmp_path / "ds"
    res = _cli([f"out_dir={out}", "n_patients=2", "in_plane=32", "slices=8",
                "longitudinal_fraction=0"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(_rows(out / "manifest.csv")) == 2
    runs = list((tmp_path / "outputs" / "synth").iterdir())
    assert len(runs) == 1 and not (out / ".hydra").exists()


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    for args in (["n_patients=0", f"out_dir={tmp_path / 'x'}"], ["no_such_key=1"],
                 [f"out_dir={tmp_path}/file.txt/ds", "n_patients=1", "in_plane=32", "slices=8"]):
        if "file.txt" in args[0]:
            (tmp_path / "file.txt").write_text("not a folder")
        res = _cli(args, tmp_path)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
