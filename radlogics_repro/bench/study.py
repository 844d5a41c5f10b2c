"""The benchmark's inputs: one synthetic chest-CT study (as a DICOM series and a HU array), the
models analyze runs, and child processes whose peak memory is measured on their own.

A child process has its own address space, so its peak resident memory is the figure a user of
the command would see, TensorFlow included; the child reports it
(:func:`radlogics_repro.bench.timing.own_peak_rss_bytes`, ``VmHWM``). Not ``ru_maxrss``: on Linux
a child's ``ru_maxrss`` (``getrusage``, ``wait4``, ``RUSAGE_CHILDREN``) starts from its parent's
RSS at fork, which here is the benchmark's several GB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radlogics_repro import io, synth
from radlogics_repro.bench.timing import cpu_count
from radlogics_repro.synth.phantom import PhantomCase


@dataclass
class BenchStudy:
    """A synthetic COVID-like study written for the benchmark.

    Attributes:
        case: the phantom with its ground truth (HU (z, y, x), lung and lesion masks, spacing mm).
        study: the same volume as an :class:`io.Study` (from the array, not re-read).
        dicom_dir: the volume as a CT DICOM series (one file per slice).
        hu_npy: the HU volume as a float32 ``.npy`` file (z, y, x), for the peer's process.
    """

    case: PhantomCase
    study: io.Study
    dicom_dir: Path
    hu_npy: Path

    def describe(self) -> str:
        z, y, x = self.case.hu.shape
        sz, sy, sx = self.case.spacing
        return f"synthetic COVID-like phantom {z} x {y} x {x} ({sz:.2f} x {sy:.2f} x {sx:.2f} mm)"


def make_bench_study(folder: Path, n_slices: int, in_plane: int, seed: int = 7) -> BenchStudy:
    """Generate the phantom (``n_slices`` slices of ``in_plane`` x ``in_plane``) into ``folder``."""
    case = synth.generate_case(seed, label=1, in_plane=in_plane, n_slices=n_slices)
    study = io.study_from_array(case.hu, case.spacing, case.origin_lps)
    dicom_dir = folder / "dicom"
    io.write_dicom_series(case.hu, case.spacing, dicom_dir, origin_lps=case.origin_lps, seed=seed)
    hu_npy = folder / "hu.npy"
    np.save(hu_npy, case.hu.astype(np.float32))
    return BenchStudy(case, study, dicom_dir, hu_npy)


# ---------------------------------------------------------------------------------------------
# Models for analyze
# ---------------------------------------------------------------------------------------------


def latest_trained_models(runs_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """The newest finished lung U-Net and classifier runs under ``runs_dir`` (as analyze picks
    them), or None when either is missing."""
    from radlogics_repro import analyze

    try:
        return (analyze.latest_run_model(runs_dir, "lung_unet"),
                analyze.latest_run_model(runs_dir, "classifier"))
    except analyze.AnalysisError:
        return None


def untrained_map_scales(classifier, n_images: int = 8, seed: int = 0) -> dict:
    """A model card's ``gradcam_scales`` for a classifier with random weights (``analysis.map_scale=
    fixed`` needs one): :func:`radlogics_repro.localize.gradcam_scales` of ``n_images`` uniform
    random crops, each treated as positive."""
    import numpy as np

    from radlogics_repro import localize

    size = int(classifier.input_shape[1])
    images = np.random.default_rng(seed).random((n_images, size, size, 3), dtype=np.float32)
    layers = localize.gradcam_scales(classifier, images, localize.MAP_SCALE_QUANTILE)
    return {"quantile": localize.MAP_SCALE_QUANTILE, "score": "logit", "slices": n_images,
            "layers": layers}


def save_random_models(folder: Path, *, size: int, unet_decoder: tuple[int, ...],
                       classifier_dense: tuple[int, ...], policies: dict[str, str]) -> tuple[Path, Path]:
    """Build both networks with random weights under each task's dtype policy and save them with
    model cards as a training run would (analyze's run time does not depend on the weights, except
    through how many slices come out positive). Returns (lung U-Net path, classifier path)."""
    from radlogics_repro import models
    from radlogics_repro.bench.compute import precision

    builders = {
        "lung_unet": lambda: models.build_lung_unet(input_shape=(size, size, 3), encoder_weights=None,
                                                    decoder_filters=unet_decoder),
        "classifier": lambda: models.build_slice_classifier(input_shape=(size, size, 3), weights=None,
                                                            dense_units=classifier_dense),
    }
    paths = []
    for task, build in builders.items():
        with precision(policies[task]):
            model = build()
        path = folder / task / "model.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        card = {"task": task, "input_size": size, "init": "random", "input_mode": "lung_crop",
                "crop_margin_mm": 10.0, "min_lung_area_mm2": 400.0, "operating_threshold": 0.5,
                "case_threshold": 0.1}
        if task == "classifier":
            card["gradcam_scales"] = untrained_map_scales(model)
        (path.parent / "model.json").write_text(json.dumps(card, indent=1))
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


@dataclass
class ChildRun:
    """A finished child process: exit code, wall seconds, the share of the machine's cores it used
    (its CPU seconds / wall seconds / cores), its JSON result (None when it failed; it carries the
    child's own ``peak_rss_bytes``) and the tail of its log."""

    exit_code: int
    wall_s: float
    cpu_share: float
    result: dict | None
    log_tail: str

    @property
    def peak_rss_bytes(self) -> int | None:
        return None if self.result is None else self.result.get("peak_rss_bytes")


def run_child(module: str, args: list[str], workdir: Path, timeout_s: float) -> ChildRun:
    """Run ``python -m module args... --json <file>`` and read the JSON it writes.

    The child's stdout and stderr go to ``<workdir>/<module>.log``; a child still running after
    ``timeout_s`` is killed (exit code -9).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result_file = workdir / f"{module.rsplit('.', 1)[-1]}.json"
    log_file = workdir / f"{module.rsplit('.', 1)[-1]}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", module, *args, "--json", str(result_file)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = -9
    wall = time.perf_counter() - start
    cpu_share = (_children_cpu_seconds() - cpu_before) / wall / cpu_count()
    result = json.loads(result_file.read_text()) if code == 0 and result_file.exists() else None
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    return ChildRun(code, wall, cpu_share, result, tail)


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of all waited-for children so far (additive, unlike memory)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
