"""Child process of the benchmark's analyze section: one study through ``analyze``, timed by stage.

    python -m radlogics_repro.bench.analyze_child --input DICOM_DIR --lung-model P \
        --classifier-model P --out-dir DIR --json RESULT.json

Loads both models (timed apart: not part of a study's time), reads the study (``io.load_study``),
runs :func:`radlogics_repro.analyze.analyze_study` with analyze's default settings (precision
included) and writes every output
(:func:`~radlogics_repro.analyze.write_study_outputs`). Writes the seconds per stage, the total
from reading the study to written outputs, and this process's own peak resident memory
(:func:`radlogics_repro.bench.timing.own_peak_rss_bytes`) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def analyze_one(input_path: str, lung_model: str, classifier_model: str, out_dir: Path) -> dict:
    """Stage seconds, total and counts for one study (see the module docstring)."""
    from radlogics_repro import analyze, io
    from radlogics_repro.bench.timing import own_peak_rss_bytes

    settings = analyze.AnalysisSettings()  # analyze's defaults, precision included
    start = time.perf_counter()
    loaded = analyze.load_analysis_models(lung_model, classifier_model, precision=settings.precision)
    models_s = time.perf_counter() - start

    start = time.perf_counter()
    study = io.load_study(input_path)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    report = analyze.analyze_study(study, loaded, settings, case_id="bench")
    analysis_s = time.perf_counter() - start
    start = time.perf_counter()
    analyze.write_study_outputs(report, study, loaded, settings, out_dir)
    outputs_s = time.perf_counter() - start
    stages = {"read study (DICOM)": load_s,
              **{k: float(v) for k, v in report.timings_s.items() if k != "outputs"},
              "write outputs (masks, figures, report)": outputs_s}
    return {
        "stages_s": stages,
        "total_s": load_s + analysis_s + outputs_s,
        "load_models_s": models_s,
        "shape": list(study.hu.shape),
        "lung_slices": int(report.summary["decision"]["lung_slices"]),
        "positive_slices": int(report.summary["decision"]["positive_slices"]),
        "peak_rss_bytes": own_peak_rss_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--lung-model", required=True)
    parser.add_argument("--classifier-model", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = analyze_one(args.input, args.lung_model, args.classifier_model, Path(args.out_dir))
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
