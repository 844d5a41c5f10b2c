"""Wall time per stage and peak memory of ``analyze`` on a 300-slice 512 x 512 synthetic study.

    python benchmarks/bench_analyze.py [--slices 300] [--lung-model PATH --classifier-model PATH]

Without model paths the networks are built with random weights at 224 (the lung U-Net with the
default decoder); run time does not depend on the weights, except that the number of slices called
positive changes how many fine maps are pasted back (a small stage). The study is a synthetic
COVID-like phantom (``radlogics_repro.synth.generate_case``). Peak memory is the process's maximum
resident set size (includes TensorFlow itself). Targets (issue): <= 60 s end to end, <= 4 GB.
Writes results/bench_analyze.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from radlogics_repro import analyze, io, models, provenance, synth

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _random_models(folder: Path) -> tuple[Path, Path]:
    paths = []
    for name, model in (("lung", models.build_lung_unet(encoder_weights=None,
                                                        decoder_filters=(128, 64, 32, 16))),
                        ("classifier", models.build_slice_classifier(weights=None))):
        path = folder / name / "model.keras"
        path.parent.mkdir(parents=True)
        model.save(path)
        (path.parent / "model.json").write_text(json.dumps(
            {"init": "random", "input_mode": "lung_crop", "operating_threshold": 0.5,
             "case_threshold": 0.1, "min_lung_area_mm2": 400.0, "crop_margin_mm": 10.0}))
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--lung-model")
    parser.add_argument("--classifier-model")
    parser.add_argument("--out", default=str(RESULTS / "bench_analyze.md"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        case = synth.generate_case(7, label=1, in_plane=512, n_slices=args.slices)
        study = io.study_from_array(case.hu, case.spacing, case.origin_lps)
        source = io.save_volume(study, case.hu, tmp / "study.nii.gz", dtype="int16")
        if args.lung_model and args.classifier_model:
            lung_path, cls_path, init = Path(args.lung_model), Path(args.classifier_model), "trained"
        else:
            lung_path, cls_path = _random_models(tmp / "models")
            init = "random weights"
        start = time.perf_counter()
        loaded = analyze.load_analysis_models(str(lung_path), str(cls_path))
        t_models = time.perf_counter() - start
        start = time.perf_counter()
        study = io.load_study(source)
        t_load = time.perf_counter() - start
        settings = analyze.AnalysisSettings()
        start = time.perf_counter()
        report = analyze.analyze_study(study, loaded, settings, case_id="bench")
        analyze.write_study_outputs(report, study, loaded, settings, tmp / "out")
        t_analysis = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    stages = {"load (NIfTI)": t_load, **report.timings_s}
    total = t_load + t_analysis
    env = provenance.environment()
    lines = [
        f"# analyze: {args.slices}-slice 512 x 512 study on this CPU",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv or sys.argv[1:])}`  ",
        f"Commit {env['commit']}; {env['date']}; {env['machine']}; TensorFlow {env['tensorflow']}; "
        f"models: {init} (loading them: {t_models:.1f} s, not counted); study: synthetic "
        f"COVID-like phantom, {study.hu.shape[0]} x {study.hu.shape[1]} x {study.hu.shape[2]}, "
        f"{report.summary['decision']['lung_slices']} lung slices, "
        f"{report.summary['decision']['positive_slices']} called positive.",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in stages.items()],
        f"| **total (load to written outputs)** | **{total:.1f}** |",
        "",
        f"Peak resident memory of the process: **{peak_gb:.2f} GB** (target <= 4 GB); "
        f"end-to-end target <= 60 s: **{'met' if total <= 60 else 'not met'}**.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
