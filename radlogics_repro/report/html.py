"""One self-contained HTML page per analysed study, and a headless-Chromium screenshot of it.

The page has no scripts, no external resources (no URLs, fonts or stylesheets): CSS is inline and
every figure is embedded as a ``data:image/png;base64,`` URI, so it opens from disk in any browser.
A Content-Security-Policy ``<meta>`` tag forbids anything else should a string slip through. Every
value from the report dict is passed through :func:`html.escape`; missing values show ``n/a``.

The report dict is the one the study analysis writes (``schema`` ``radlogics_repro.study_report``,
version 1)::

    case_id, analysed_at, notice,
    decision: {suspected_covid, positive_slice_ratio, threshold, positive_slices, lung_slices,
               slice_threshold},
    corona_score_cm3,
    volumes: {lung_ml: {total, right, left}, infection_cm3: {total, ggo, consolidation},
              lung_involvement_percent},
    timings_s: {stage: seconds}, provenance: {nested}, input: {kind, n_slices, spacing_mm}

Pass a pseudonymous case id only; provenance keys that name patient identifiers (patient name, ID,
birth date) are dropped as a safeguard.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from radlogics_repro import RESEARCH_USE_NOTICE
from radlogics_repro.report.study_figures import ReportError

logger = logging.getLogger(__name__)

NA = "n/a"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)
_IDENTIFYING_KEYS = {
    "patientname", "patientsname", "patientid", "otherpatientids", "patientbirthdate",
    "patientsbirthdate", "birthdate", "dateofbirth", "dob",
}

CORONA_SCORE_NOTE = (
    "The Corona Score estimates the volume of abnormal lung in cm\u00b3: the sum, over the slices "
    "the classifier calls positive and over their pixels, of the fine localization map value "
    "(0 to 1) \u00d7 pixel area (mm\u00b2) \u00d7 slice spacing (mm), divided by 1000. It is a "
    "map-weighted volume, not a segmentation; follow it over a patient's successive scans to see "
    "the course of the disease."
)

CSS = """
body { font-family: sans-serif; margin: 0; color: #222; background: #fafafa; }
main { max-width: 1120px; margin: 0 auto; padding: 0 20px 30px 20px; }
.banner { background: #b00020; color: #fff; font-weight: bold; font-size: 20px; text-align: center;
  padding: 14px 10px; letter-spacing: 0.3px; }
h1 { font-size: 24px; margin: 18px 0 4px 0; }
h2 { font-size: 18px; margin: 26px 0 8px 0; border-bottom: 1px solid #ccc; padding-bottom: 3px; }
.meta { color: #555; margin: 0 0 12px 0; }
.decision { border-radius: 6px; padding: 12px 16px; font-size: 17px; margin: 14px 0; }
.decision.pos { background: #fde3e1; border: 2px solid #c62828; }
.decision.neg { background: #e3f2e5; border: 2px solid #2e7d32; }
.decision.na { background: #eee; border: 2px solid #888; }
.decision .verdict { font-size: 22px; font-weight: bold; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px;
  min-width: 230px; flex: 1; }
.card .big { font-size: 24px; font-weight: bold; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 14px 0; background: #fff; border: 1px solid #ddd; padding: 8px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #444; font-size: 14px; margin-top: 6px; }
.note { color: #444; font-size: 14px; }
.provenance { font-size: 12px; }
.provenance td { word-break: break-all; }
footer { margin-top: 30px; color: #b00020; font-weight: bold; text-align: center; }
"""


# ------------------------------------------------------------------------------------------------
# value formatting
# ------------------------------------------------------------------------------------------------
def _get(report: Mapping, *keys):
    """``report[k1][k2]...`` or None when any level is missing or not a mapping."""
    value = report
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _number(value, fmt: str = "{:.1f}", unit: str = "") -> str:
    """Formatted, escaped number; ``n/a`` for None, NaN, booleans and non-numbers."""
    if value is None or isinstance(value, bool):
        return NA
    try:
        number = float(value)
    except (TypeError, ValueError):
        return NA
    if not math.isfinite(number):
        return NA
    return html.escape(fmt.format(number) + (f" {unit}" if unit else ""))


def _text(value) -> str:
    """Escaped text; ``n/a`` for None or an empty string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return NA
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def _decision_section(report: Mapping) -> str:
    suspected = _get(report, "decision", "suspected_covid")
    if suspected is True:
        css, verdict = "pos", "Suspected COVID-19"
    elif suspected is False:
        css, verdict = "neg", "Not suspected"
    else:
        css, verdict = "na", f"Decision: {NA}"
    ratio = _number(_get(report, "decision", "positive_slice_ratio"), "{:.3f}")
    threshold = _number(_get(report, "decision", "threshold"), "{:.3f}")
    positive = _number(_get(report, "decision", "positive_slices"), "{:.0f}")
    lung = _number(_get(report, "decision", "lung_slices"), "{:.0f}")
    slice_threshold = _number(_get(report, "decision", "slice_threshold"), "{:.2f}")
    comparison = _comparison(_get(report, "decision", "positive_slice_ratio"),
                             _get(report, "decision", "threshold"))
    return (
        f'<div class="decision {css}"><div class="verdict">{verdict}</div>'
        f"<div>positive-slice ratio {ratio} ({positive} positive of {lung} slices with lung) "
        f"{comparison} case threshold {threshold}; a slice is positive when the classifier's "
        f"probability is at least {slice_threshold}.</div></div>"
    )


def _comparison(left, right) -> str:
    """``&gt;``, ``=`` or ``&lt;`` between two numbers, ``vs`` when either is missing."""
    if _number(left) == NA or _number(right) == NA:
        return "vs"
    left, right = float(left), float(right)
    return "&gt;" if left > right else ("&lt;" if left < right else "=")


def _measures_section(report: Mapping) -> str:
    corona = _number(report.get("corona_score_cm3"), "{:.1f}", "cm\u00b3")
    lung = {k: _number(_get(report, "volumes", "lung_ml", k), "{:.0f}", "mL")
            for k in ("total", "right", "left")}
    infection = {k: _number(_get(report, "volumes", "infection_cm3", k), "{:.1f}", "cm\u00b3")
                 for k in ("total", "ggo", "consolidation")}
    involvement = _number(_get(report, "volumes", "lung_involvement_percent"), "{:.1f}", "%")
    return (
        '<div class="cards">'
        f'<div class="card">Corona Score<div class="big">{corona}</div></div>'
        f'<div class="card">Lung volume<div class="big">{lung["total"]}</div>'
        f'right {lung["right"]}, left {lung["left"]}</div>'
        f'<div class="card">Infection volume<div class="big">{infection["total"]}</div>'
        f'ground-glass opacity {infection["ggo"]}, consolidation {infection["consolidation"]}'
        "</div>"
        f'<div class="card">Lung involved<div class="big">{involvement}</div>'
        "infection volume / lung volume</div>"
        "</div>"
    )


def _timings_section(report: Mapping) -> str:
    timings = report.get("timings_s")
    if not isinstance(timings, Mapping) or not timings:
        return f'<p class="note">Timings: {NA}</p>'
    rows, total = [], 0.0
    for stage, seconds in timings.items():
        rows.append(f"<tr><td>{_text(stage)}</td><td class=\"num\">{_number(seconds, '{:.2f}')}</td></tr>")
        if _number(seconds) != NA:
            total += float(seconds)
    if "total" not in timings:
        rows.append(f'<tr><th>total</th><th class="num">{_number(total, "{:.2f}")}</th></tr>')
    return "<table><tr><th>stage</th><th>seconds</th></tr>" + "".join(rows) + "</table>"


def _input_section(report: Mapping) -> str:
    kind = _text(_get(report, "input", "kind"))
    n_slices = _number(_get(report, "input", "n_slices"), "{:.0f}")
    spacing = _get(report, "input", "spacing_mm")
    if isinstance(spacing, (list, tuple)) and spacing:
        spacing_text = html.escape(" \u00d7 ".join(
            f"{float(s):.3g}" if _number(s) != NA else NA for s in spacing) + " mm (z, y, x)")
    else:
        spacing_text = NA
    return (f'<p class="meta">Input: {kind}, {n_slices} slices, voxel spacing {spacing_text}.</p>')


def _figures_section(images: Mapping[str, os.PathLike | str]) -> str:
    if not images:
        return f'<p class="note">Figures: {NA}</p>'
    parts = []
    for caption, image_path in images.items():
        uri = png_data_uri(image_path)
        parts.append(f'<figure><img src="{uri}" alt="{html.escape(str(caption))}">'
                     f"<figcaption>{html.escape(str(caption))}</figcaption></figure>")
    return "".join(parts)


def _flatten(mapping: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if str(key).replace("_", "").replace(" ", "").lower() in _IDENTIFYING_KEYS:
            continue
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, name) if value else [(name, "{}")])
        else:
            rows.append((name, value))
    return rows


def _provenance_section(report: Mapping) -> str:
    provenance = report.get("provenance")
    if not isinstance(provenance, Mapping) or not provenance:
        return f'<p class="note">Provenance: {NA}</p>'
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{_text(value)}</td></tr>"
                   for name, value in _flatten(provenance))
    return f'<table class="provenance"><tr><th>key</th><th>value</th></tr>{rows}</table>'


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def png_data_uri(path: str | os.PathLike) -> str:
    """``data:image/png;base64,...`` of a PNG file; :class:`ReportError` if missing or not a PNG."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ReportError(f"{path}: cannot read figure ({error.strerror})") from error
    if not data.startswith(PNG_SIGNATURE):
        raise ReportError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_html_report(report: Mapping, images: Mapping[str, os.PathLike | str]) -> str:
    """The report page as a string (see :func:`write_html_report`)."""
    if not isinstance(report, Mapping):
        raise ReportError(f"report must be a dict, got {type(report).__name__}")
    notice = html.escape(RESEARCH_USE_NOTICE)
    case_id = _text(report.get("case_id"))
    analysed = _text(report.get("analysed_at"))
    created = html.escape(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    extra_notice = report.get("notice")
    extra = ("" if not extra_notice or str(extra_notice) == RESEARCH_USE_NOTICE
             else f'<p class="note">{_text(extra_notice)}</p>')
    body = [
        f'<div class="banner">\u26a0 {notice}</div>',
        "<main>",
        f"<h1>Chest CT analysis: case {case_id}</h1>",
        f'<p class="meta">Analysed: {analysed}. Report written: {created}. '
        "Automated research pipeline (RADLogics reproduction).</p>",
        extra,
        _input_section(report),
        "<h2>Case decision</h2>",
        _decision_section(report),
        "<h2>Measurements</h2>",
        _measures_section(report),
        f'<p class="note">{html.escape(CORONA_SCORE_NOTE)}</p>',
        "<h2>Figures</h2>",
        _figures_section(images),
        "<h2>Processing time</h2>",
        _timings_section(report),
        "<h2>Provenance</h2>",
        _provenance_section(report),
        f"<footer>{notice}</footer>",
        "</main>",
    ]
    head = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{notice} Case {case_id}</title>\n<style>{CSS}</style>\n</head>\n"
    )
    return head + "<body>\n" + "\n".join(part for part in body if part) + "\n</body>\n</html>\n"


def write_html_report(report: Mapping, images: Mapping[str, os.PathLike | str],
                      path: str | os.PathLike) -> Path:
    """Write one self-contained HTML report of a study; return its path.

    Args:
        report: the study report dict (layout in the module docstring); missing keys show ``n/a``.
        images: figure caption -> PNG path, in display order (e.g. ``{"3D overview ...": p1,
            "Slice 57, most involved ...": p2}``); each PNG is embedded as base64.
        path: output ``.html``; written to a temporary sibling and renamed into place.
    """
    text = render_html_report(report, images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.html")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot_html(html_path: str | os.PathLike, png_path: str | os.PathLike, *,
                    width: int = 1200, height: int = 2400, timeout: float = 120.0) -> bool:
    """Render ``html_path`` to a ``width`` x ``height`` PNG with headless Chromium.

    Returns False (and logs why) when Chromium is not installed, fails or times out; True when the
    PNG was written (atomically). Chromium runs with a throw-away profile and its network-touching
    background services off; the page itself loads nothing from the network.
    """
    chromium = find_chromium()
    if chromium is None:
        logger.info("no chromium on PATH; no screenshot of %s", html_path)
        return False
    html_file = Path(html_path).resolve()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="radlogics-chromium-") as profile:
        tmp_png = Path(profile) / "shot.png"
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--screenshot={tmp_png}", f"--window-size={int(width)},{int(height)}",
                   html_file.as_uri()]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    check=False)
        except subprocess.TimeoutExpired:
            logger.warning("chromium timed out after %.0f s on %s", timeout, html_file)
            return False
        except OSError as error:
            logger.warning("chromium could not start: %s", error)
            return False
        if not tmp_png.is_file() or tmp_png.stat().st_size == 0:
            logger.warning("chromium wrote no screenshot of %s (exit %d): %s", html_file,
                           result.returncode, result.stderr.strip()[-300:])
            return False
        staged = png_path.with_name(f".{png_path.stem}.tmp.png")
        shutil.copyfile(tmp_png, staged)
        os.replace(staged, png_path)
    return True
