"""Tests of radlogics_repro.report: 3D overview, slice overlays, Corona curve, HTML report.

Synthetic inputs only: two ellipsoid "lungs" (the patient's right one at low x, the left one at high
x) and a spherical "infection" in the right lung, on a 40 x 64 x 64 grid of 5 x 4 x 4 mm.
"""

from __future__ import annotations

import re
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest

from radlogics_repro import RESEARCH_USE_NOTICE
from radlogics_repro.report import (
    ReportError,
    corona_curve_png,
    most_involved_slices,
    render_3d_overview,
    render_html_report,
    screenshot_html,
    slice_overlay_png,
    write_html_report,
)
from radlogics_repro.report.html import find_chromium
from radlogics_repro.report.overview import mask_surface

SPACING = (5.0, 4.0, 4.0)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masks():
    z, y, x = np.indices((40, 64, 64), dtype=np.float32)
    right = ((x - 20) / 11) ** 2 + ((y - 32) / 16) ** 2 + ((z - 20) / 16) ** 2 < 1
    left = ((x - 44) / 11) ** 2 + ((y - 32) / 16) ** 2 + ((z - 20) / 16) ** 2 < 1
    infection = ((x - 20) / 4) ** 2 + ((y - 38) / 4) ** 2 + ((z - 14) / 3) ** 2 < 1
    return right | left, infection & right


@pytest.fixture(scope="module")
def hu_slice(masks):
    lung, _ = masks
    rng = np.random.default_rng(0)
    return np.where(lung[20], -850.0, 40.0).astype(np.float32) + rng.normal(0, 20, (64, 64))


def _png(path):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def _red_pixels_above_notice(image):
    """Red pixels in the top 90 % of an overview PNG (the notice is in the bottom strip)."""
    top = image[: int(0.9 * image.shape[0]), :, :3]
    return int(((top[..., 0] > 0.6) & (top[..., 1] < 0.35) & (top[..., 2] < 0.3)).sum())


def _report(**overrides):
    report = {
        "schema": "radlogics_repro.study_report", "schema_version": 1,
        "notice": RESEARCH_USE_NOTICE, "case_id": "P0001_d003",
        "analysed_at": "2024-05-01T12:00:00+00:00",
        "decision": {"suspected_covid": True, "positive_slice_ratio": 0.25, "threshold": 0.05,
                     "positive_slices": 10, "lung_slices": 40, "slice_threshold": 0.5},
        "corona_score_cm3": 42.17,
        "volumes": {"lung_ml": {"total": 4210.3, "right": 2250.1, "left": 1960.2},
                    "infection_cm3": {"total": 61.25, "ggo": 50.0, "consolidation": 11.25},
                    "lung_involvement_percent": 1.45},
        "timings_s": {"load": 1.5, "lung_segmentation": 2.25},
        "provenance": {"commit": "abc1234", "models": {"classifier": {"init": "imagenet"}},
                       "PatientName": "Doe^Jane"},
        "input": {"kind": "nifti", "n_slices": 40, "spacing_mm": [5.0, 4.0, 4.0]},
    }
    report.update(overrides)
    return report


# ------------------------------------------------------------------------------------------------
# 3D overview
# ------------------------------------------------------------------------------------------------
def test_overview_lungs_and_infection(masks, tmp_path):
    lung, infection = masks
    path = render_3d_overview(lung, infection, SPACING, tmp_path / "ov.png", title="P0001_d003")
    assert path == tmp_path / "ov.png"
    image = _png(path)
    assert 600 <= image.shape[1] <= 1000 and image.shape[0] >= 500
    # the opaque infection colour (#d7301f) appears above the (dark red) notice line
    assert _red_pixels_above_notice(image) > 300
    # no temporary file is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["ov.png"]


def test_overview_ggo_and_consolidation(masks, tmp_path):
    lung, infection = masks
    core = np.zeros_like(infection)
    core[13:16, 36:40, 18:22] = True
    path = render_3d_overview(lung, None, SPACING, tmp_path / "ov.png", ggo_mask=infection,
                              consolidation_mask=core)
    assert _png(path).std() > 0
    # empty GGO / consolidation masks fall back to the one-colour infection mask
    empty = np.zeros_like(infection)
    fallback = render_3d_overview(lung, infection, SPACING, tmp_path / "fb.png", ggo_mask=empty,
                                  consolidation_mask=empty)
    assert _red_pixels_above_notice(_png(fallback)) > 300


def test_overview_lungs_only_and_empty(masks, tmp_path):
    lung, _ = masks
    only = _png(render_3d_overview(lung, np.zeros_like(lung), SPACING, tmp_path / "lungs.png"))
    assert _red_pixels_above_notice(only) < 20
    empty = _png(render_3d_overview(np.zeros_like(lung), None, SPACING, tmp_path / "empty.png"))
    assert empty.std() > 0


def test_surface_in_world_millimetres(masks):
    """A surface of the right lung spans x 9..31 voxels -> about 36..124 mm, y in mm too."""
    lung, _ = masks
    right = lung.copy()
    right[:, :, 32:] = False
    surface = mask_surface(right, SPACING, smooth_mm=0.0, target_mm=4.0)
    assert surface is not None
    x_lo, y_lo, z_lo = surface.lower
    x_hi, y_hi, z_hi = surface.upper
    assert 30 < x_lo < 44 and 116 < x_hi < 130  # patient-left axis (X), mm
    assert 60 < y_lo < 72 and 184 < y_hi < 196  # posterior axis (Y): 32 +- 16 voxels x 4 mm
    assert 15 < z_lo < 30 and 170 < z_hi < 185  # superior axis (Z): 20 +- 16 slices x 5 mm
    assert mask_surface(np.zeros((4, 4, 4), bool), SPACING) is None
    # one voxel at (z, y, x) = (5, 10, 12): a small blob around (X, Y, Z) = (48, 40, 25) mm
    dot = np.zeros((10, 20, 20), bool)
    dot[5, 10, 12] = True
    blob = mask_surface(dot, SPACING)
    assert np.allclose((blob.lower + blob.upper) / 2, [48.0, 40.0, 25.0], atol=2.5)


def test_surface_respects_face_budget(masks):
    lung, _ = masks
    fine = mask_surface(lung, SPACING, target_mm=4.0, smooth_mm=0.0, max_faces=10**9)
    capped = mask_surface(lung, SPACING, target_mm=4.0, smooth_mm=0.0, max_faces=2000)
    assert len(fine.faces) > 2000 >= len(capped.faces)


def test_overview_rejects_bad_input(masks, tmp_path):
    lung, infection = masks
    with pytest.raises(ReportError, match="spacing"):
        render_3d_overview(lung, infection, (1.0, 0.0, 1.0), tmp_path / "x.png")
    with pytest.raises(ReportError, match="infection_mask has shape"):
        render_3d_overview(lung, infection[:-1], SPACING, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------
# slice overlay, Corona curve, slice choice
# ------------------------------------------------------------------------------------------------
def test_slice_overlay_png(masks, hu_slice, tmp_path):
    lung, infection = masks
    fine_map = np.zeros((64, 64), np.float32)
    fine_map[30:46, 12:28] = np.linspace(0, 1, 16)[None, :]
    path = slice_overlay_png(hu_slice, tmp_path / "sub" / "overlay.png", lung_mask=lung[20],
                             fine_map=fine_map, infection_mask=infection[14], title="slice 20")
    image = _png(path)
    assert image.shape[:2] == (510, 1100)
    # the plain panel (left half) keeps grey anatomy (only the small R/L/A/P marks are coloured);
    # the overlay panel adds the colour map
    colourful = np.ptp(image[..., :3], axis=-1) > 0.3
    assert colourful[:, 560:1000].sum() > 5 * colourful[:, :540].sum()


def test_slice_overlay_plain_and_errors(hu_slice, tmp_path):
    assert _png(slice_overlay_png(hu_slice, tmp_path / "plain.png")).std() > 0
    with pytest.raises(ReportError, match="fine_map has shape"):
        slice_overlay_png(hu_slice, tmp_path / "x.png", fine_map=np.zeros((10, 10)))
    with pytest.raises(ReportError, match="2D"):
        slice_overlay_png(hu_slice[None], tmp_path / "x.png")


def test_corona_curve_png(tmp_path):
    path = corona_curve_png([9, 0, 4], [160.0, 0.5, 60.0], tmp_path / "curve.png",
                            true_volumes=[169.0, 0.0, float("nan")],
                            case_ids=["d009", "d000", "d004"], title="P0007")
    image = _png(path)
    assert image.shape[1] > 600 and image.std() > 0
    assert _png(corona_curve_png([], [], tmp_path / "none.png")).std() > 0
    with pytest.raises(ReportError, match="differ in length"):
        corona_curve_png([0, 1], [1.0], tmp_path / "bad.png")


def test_most_involved_slices():
    mass = [0.0, 5.0, 2.0, 5.0, 7.0, 0.0]
    assert most_involved_slices(mass, 3) == [4, 1, 3]  # tie 5.0 -> lower index first
    assert most_involved_slices(mass, 0) == []
    assert most_involved_slices(mass, 10) == [4, 1, 3, 2, 0, 5]
    maps = np.zeros((3, 2, 2))
    maps[2] = 0.5
    maps[0, 0, 0] = 1.0
    assert most_involved_slices(maps, 2) == [2, 0]  # masses 1.0, 0.0, 2.0
    with pytest.raises(ReportError):
        most_involved_slices([1.0, np.nan], 1)


# ------------------------------------------------------------------------------------------------
# HTML report
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def figure_png(tmp_path_factory, hu_slice):
    return slice_overlay_png(hu_slice, tmp_path_factory.mktemp("fig") / "slice.png")


def test_html_self_contained(figure_png, tmp_path):
    path = write_html_report(_report(), {"Slice 20: most involved": figure_png,
                                         "second": figure_png}, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", text)
    assert len(sources) == 2
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    for reference in ("http://", "https://", "src=\"file", "<script", "<link", "url(", "@import"):
        assert reference not in text.lower()
    assert text.count(RESEARCH_USE_NOTICE) >= 2  # banner and footer
    assert text.index(RESEARCH_USE_NOTICE) < text.index("P0001_d003")  # banner comes first
    assert "Suspected COVID-19" in text and "0.250" in text and "0.050" in text
    assert "42.2 cm\u00b3" in text and "4210 mL" in text and "11.2 cm\u00b3" in text
    assert "lung_segmentation" in text and "3.75" in text  # timings and their total
    assert "Doe^Jane" not in text and "PatientName" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_html_escapes_strings():
    text = render_html_report(_report(case_id="<script>alert('x')</script>",
                                      provenance={"note": "<b>&"}), {})
    assert "<script" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;&amp;" in text


def test_html_missing_keys_show_na():
    text = render_html_report({"case_id": "P9"}, {})
    assert "Decision: n/a" in text
    assert text.count("n/a") >= 10
    negative = render_html_report(_report(decision={"suspected_covid": False,
                                                    "positive_slice_ratio": 0.01,
                                                    "threshold": 0.05}), {})
    assert "Not suspected" in negative and "&lt; case threshold 0.050" in negative


def test_html_rejects_non_png(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a")
    with pytest.raises(ReportError, match="not a PNG"):
        render_html_report(_report(), {"x": fake})
    with pytest.raises(ReportError, match="cannot read"):
        render_html_report(_report(), {"x": tmp_path / "missing.png"})


def test_screenshot_without_chromium(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert screenshot_html(tmp_path / "a.html", tmp_path / "a.png") is False
    assert not (tmp_path / "a.png").exists()


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")
def test_screenshot_html(figure_png, tmp_path):
    html_path = write_html_report(_report(), {"slice": figure_png}, tmp_path / "report.html")
    png = tmp_path / "shot.png"
    assert screenshot_html(html_path, png, width=800, height=1200)
    image = _png(png)
    assert image.shape[:2] == (1200, 800)
    assert image[..., :3].var() > 0
