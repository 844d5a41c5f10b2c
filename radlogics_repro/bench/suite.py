"""The benchmark suite: runs the sections, builds the table and the markdown document.

Sections (in this order; ``sections=[...]`` picks some):

========  ==================================================================================
roof      float32 and bfloat16 GFLOP/s of a large matmul and a 3x3 convolution (:mod:`.compute`)
models    U-Net and classifier inference and training images/s, share of the roof, bf16 speed-up
pipeline  ``fit`` steps/s on the real tf.data pipeline vs the same batches in memory (:mod:`.pipeline`)
gradcam   Grad-CAM s/image, fused engine vs tf-keras-vis (:mod:`.gradcam`)
analyze   one 300-slice 512 x 512 study through analyze in its own process: stages, total, peak RSS
dicom     DICOM series read slices/s vs SimpleITK (:mod:`.dicom`)
peer      lungmask's R231 network on the same study, beside our lung segmentation (:mod:`.peer_child`)
========  ==================================================================================
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from radlogics_repro import provenance
from radlogics_repro.bench import compute, dicom, gradcam, pipeline
from radlogics_repro.bench.study import (
    BenchStudy,
    latest_trained_models,
    make_bench_study,
    run_child,
    save_random_models,
)
from radlogics_repro.bench.timing import Row, cpu_count, markdown_table, plain_table
from radlogics_repro.cli import UserError

log = logging.getLogger(__name__)


class BenchError(UserError):
    """A benchmark setting that cannot be used (an unknown section, ...)."""


SECTIONS = ("roof", "models", "pipeline", "gradcam", "analyze", "dicom", "peer")
TASKS = ("lung_unet", "classifier")
ANALYZE_TARGET_S = 60.0
ANALYZE_TARGET_GB = 4.0


@dataclass
class TaskPreset:
    """What training uses for one task (from ``conf/experiment/<task>.yaml`` and its trainer)."""

    batch_size: int
    precision: str
    augment: dict
    decoder_filters: tuple[int, ...] | None = None
    dense_units: tuple[int, ...] | None = None


@dataclass
class BenchSettings:
    """Everything the suite measures and at which sizes (plain values; see :func:`quick_settings`)."""

    presets: dict[str, TaskPreset]
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False
    repeats: int = 3
    roof_repeats: int = 5
    roof: compute.RoofSettings = field(default_factory=compute.RoofSettings)
    precisions: tuple[str, ...] = ("float32", "mixed_bfloat16")
    classifier_precisions: tuple[str, ...] | None = None
    train_precisions: tuple[str, ...] | None = None
    network: compute.NetworkSettings = field(default_factory=compute.NetworkSettings)
    batch: int = 16
    train_tasks: tuple[str, ...] = TASKS
    train_batch: int | None = None
    pipeline_tasks: tuple[str, ...] = ("classifier", "lung_unet")
    pipeline_steps: int = 4      # per fit call; each call starts the pipeline's iterator anew
    pipeline_repeats: int = 3
    gradcam_batch: int = 8
    study_slices: int = 300
    study_in_plane: int = 512
    lung_model: str | None = None
    classifier_model: str | None = None
    runs_dir: str = "runs"
    peer_slices: int | None = 60  # None: every slice of the study (about 11 min for 300 here)
    peer_batch: int = 20
    child_timeout_s: float = 1800.0
    note: str = ""


def quick_settings(presets: dict[str, TaskPreset], **overrides) -> BenchSettings:
    """Tiny sizes and one repeat: the whole suite in seconds, for tests. Its numbers say nothing
    about speed. Training is timed for the U-Net only (ResNet-50's training graph alone takes 20 s
    and more to build here), so the pipeline section uses the U-Net too, and the classifier runs in
    float32 only (each ResNet-50 build and trace costs seconds); training runs at the U-Net
    experiment's precision only (so the pipeline section reuses its traced step)."""
    values = dict(
        quick=True, repeats=1, roof_repeats=1,
        roof=compute.RoofSettings(matmul_sizes=(128, 256), conv=(1, 16, 32)),
        network=compute.NetworkSettings(size=32, unet_decoder=(8, 8, 8, 8), classifier_dense=(8, 4)),
        classifier_precisions=("float32",), train_precisions=(presets["lung_unet"].precision,), batch=2,
        train_tasks=("lung_unet",), train_batch=2, pipeline_tasks=("lung_unet",), pipeline_steps=2,
        pipeline_repeats=1,
        gradcam_batch=2, study_slices=16, study_in_plane=64, peer_slices=2, peer_batch=2,
        child_timeout_s=300.0,
        presets={task: dataclasses.replace(p, batch_size=2, decoder_filters=(8, 8, 8, 8),
                                           dense_units=(8, 4)) for task, p in presets.items()})
    values.update(overrides)
    return BenchSettings(**values)


@dataclass
class BenchRun:
    """A finished suite: its rows and the facts the document states besides the table."""

    rows: list[Row]
    settings: BenchSettings
    environment: dict
    load_before: float
    load_after: float
    facts: list[str]
    failed: list[str]


class _Context:
    """What sections share: the models, the study (made on first use), results of earlier sections."""

    def __init__(self, settings: BenchSettings, workdir: Path):
        self.settings = settings
        self.workdir = workdir
        self.zoo = compute.ModelZoo(settings.network)
        self._study: BenchStudy | None = None
        self.roof_f32: float | None = None
        self.analyze: dict | None = None
        self.facts: list[str] = []

    @property
    def study(self) -> BenchStudy:
        if self._study is None:
            s = self.settings
            self._study = make_bench_study(self.workdir / "study", s.study_slices, s.study_in_plane)
            self.facts.append(f"Study (analyze, dicom, pipeline, peer): {self._study.describe()}, "
                              "written as a CT DICOM series.")
        return self._study


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _roof(ctx: _Context) -> list[Row]:
    s = ctx.settings
    rows, roofs = compute.roof_rows(s.roof, s.precisions, s.roof_repeats)
    ctx.roof_f32 = roofs.get("float32")
    return rows


def _models(ctx: _Context) -> list[Row]:
    s = ctx.settings
    rows = []

    def precisions(task):
        return s.classifier_precisions or s.precisions if task == "classifier" else s.precisions

    for task in TASKS:
        rows += compute.network_rows(ctx.zoo, task, "inference", precisions(task), s.batch, s.roof,
                                     s.repeats)
    for task in s.train_tasks:
        batch = s.train_batch or s.presets[task].batch_size
        rows += compute.network_rows(ctx.zoo, task, "training", s.train_precisions or precisions(task),
                                     batch, s.roof, s.repeats, inference_target=None)
    return rows


def _pipeline(ctx: _Context) -> list[Row]:
    s = ctx.settings
    case = ctx.study.case
    rows = []
    for task in s.pipeline_tasks:
        preset = s.presets[task]
        slices = pipeline.task_slices(task, ctx.study.study, case.lung_mask, case.lesion_mask,
                                      s.network.size)
        rows.append(pipeline.pipeline_row(ctx.zoo, task, preset.precision, slices,
                                          batch=preset.batch_size, augment_settings=preset.augment,
                                          steps=s.pipeline_steps, repeats=s.pipeline_repeats))
    return rows


def _gradcam(ctx: _Context) -> list[Row]:
    return gradcam.gradcam_rows(ctx.zoo, batch=ctx.settings.gradcam_batch, repeats=ctx.settings.repeats)


def _analysis_models(ctx: _Context) -> tuple[str, str, str]:
    """(lung model, classifier model, description): given paths, else the newest trained runs,
    else random-weight networks of the trained architecture saved into the work folder."""
    s = ctx.settings
    if s.lung_model and s.classifier_model:
        return s.lung_model, s.classifier_model, f"given: {s.lung_model}, {s.classifier_model}"
    trained = None if s.quick else latest_trained_models(s.runs_dir)
    if trained:
        return str(trained[0]), str(trained[1]), f"trained: {trained[0]}, {trained[1]}"
    lung, classifier = save_random_models(
        ctx.workdir / "models", size=s.network.size,
        unet_decoder=tuple(s.presets["lung_unet"].decoder_filters),
        classifier_dense=tuple(s.presets["classifier"].dense_units),
        policies={task: s.presets[task].precision for task in TASKS})
    return str(lung), str(classifier), (
        f"random weights (no finished runs under {s.runs_dir}/), the trained architecture: U-Net decoder "
        f"{','.join(map(str, s.presets['lung_unet'].decoder_filters))}, {s.network.size} px, "
        f"{s.presets['lung_unet'].precision} / {s.presets['classifier'].precision}")


def _analyze(ctx: _Context) -> list[Row]:
    s = ctx.settings
    lung, classifier, which = _analysis_models(ctx)
    child = run_child("radlogics_repro.bench.analyze_child",
                      ["--input", str(ctx.study.dicom_dir), "--lung-model", lung, "--classifier-model",
                       classifier, "--out-dir", str(ctx.workdir / "analysis")],
                      ctx.workdir / "children", s.child_timeout_s)
    if child.result is None:
        raise RuntimeError(f"analyze child exited with {child.exit_code}:\n{child.log_tail}")
    result = ctx.analyze = child.result
    ctx.facts.append(f"analyze models: {which} (loading them took {result['load_models_s']:.1f} s, "
                     "not counted).")
    total = result["total_s"]
    rows = [Row("analyze", f"stage: {name}", f"{seconds:.2f} s", ratio=seconds / total,
                ratio_text=f"{seconds / total:.0%} of total")
            for name, seconds in result["stages_s"].items()]
    shape = " x ".join(map(str, result["shape"]))
    rows.append(Row("analyze", f"total, read study to written outputs ({shape}; {result['lung_slices']} "
                               f"lung slices, {result['positive_slices']} positive)",
                    f"{total:.1f} s ({total / result['shape'][0]:.3f} s/slice)",
                    target=f"<= {ANALYZE_TARGET_S:.0f} s", met=total <= ANALYZE_TARGET_S,
                    cpu=child.cpu_share))
    gb = child.peak_rss_bytes / 1e9
    rows.append(Row("analyze", "peak resident memory of the analyze process (its VmHWM)",
                    f"{gb:.2f} GB", target=f"<= {ANALYZE_TARGET_GB:.0f} GB", met=gb <= ANALYZE_TARGET_GB))
    return rows


def _dicom(ctx: _Context) -> list[Row]:
    study = ctx.study
    return dicom.dicom_rows(study.dicom_dir, study.case.hu.shape[0], ctx.settings.repeats)


def lungmask_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("lungmask", "torch"))


def _peer(ctx: _Context) -> list[Row]:
    s = ctx.settings
    figure = "lungmask R231 network (random weights), whole LMInferer.apply"
    if not lungmask_available():
        return [Row("peer", figure, "skipped: lungmask is not installed",
                    reference="install the optional extra: pip install -e .[bench] (README)")]
    args = ["--hu", str(ctx.study.hu_npy), "--batch", str(s.peer_batch)]
    if s.peer_slices:
        args += ["--slices", str(s.peer_slices)]
    child = run_child("radlogics_repro.bench.peer_child", args, ctx.workdir / "children", s.child_timeout_s)
    if child.result is None:
        raise RuntimeError(f"lungmask child exited with {child.exit_code}:\n{child.log_tail}")
    peer = child.result
    n = peer["slices"]
    ctx.facts.append(f"peer: lungmask {peer['lungmask']}, torch {peer['torch']} (CPU) on {peer['threads']} "
                     f"threads, batch {peer['batch']}, {n} slices resampled to 256 x 256; peak RSS of its "
                     f"process {child.peak_rss_bytes / 1e9:.2f} GB.")
    study_slices = ctx.study.case.hu.shape[0]
    measured = f"{peer['total_s']:.1f} s ({peer['total_s'] / n:.3f} s/slice)"
    if n < study_slices:
        measured += f"; {peer['total_s'] / n * study_slices:.0f} s for all {study_slices} (extrapolated)"
    whole = Row("peer", f"{figure}: {n} evenly spaced of the study's {study_slices} slices (crop, "
                        "resample to 256 px, network, 3D post-processing)", measured, cpu=child.cpu_share)
    stages = (ctx.analyze or {}).get("stages_s", {})
    if "lung_segmentation" in stages:
        ours = stages["lung_segmentation"] / ctx.analyze["shape"][0]
        whole.reference = f"ours: analyze lung_segmentation {ours:.3f} s/slice"
        whole.ratio = (peer["total_s"] / n) / ours
        whole.ratio_text = f"{whole.ratio:.2f}x our time per slice"
    gflops = peer["gflop_per_slice"] * n / peer["network_s"]
    network = Row("peer", f"lungmask R231 network only ({peer['gflop_per_slice']:.1f} GFLOP/slice at 256 px, "
                          "float32)", f"{peer['network_s']:.1f} s -> {gflops:.0f} GFLOP/s")
    if ctx.roof_f32:
        network.reference = f"float32 roof {ctx.roof_f32:.0f} GFLOP/s (roof section)"
        network.ratio = gflops / ctx.roof_f32
        network.ratio_text = f"{network.ratio:.0%} of roof"
    return [whole, network]


SECTION_FUNCTIONS: dict[str, Callable[[_Context], list[Row]]] = {
    "roof": _roof, "models": _models, "pipeline": _pipeline, "gradcam": _gradcam, "analyze": _analyze,
    "dicom": _dicom, "peer": _peer}


# ---------------------------------------------------------------------------------------------
# The run and its document
# ---------------------------------------------------------------------------------------------


def run(settings: BenchSettings, workdir: str | os.PathLike | None = None) -> BenchRun:
    """Run the chosen sections in order; a section that fails gets one row saying so and the
    suite goes on (:attr:`BenchRun.failed` lists them)."""
    unknown = [s for s in settings.sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    failed: list[str] = []
    durations: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="radlogics_bench_", dir=workdir) as tmp:
        ctx = _Context(settings, Path(tmp))
        for section in SECTIONS:
            if section not in settings.sections:
                continue
            log.info("bench: %s", section)
            start = time.perf_counter()
            try:
                rows += SECTION_FUNCTIONS[section](ctx)
            except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
                log.error("section %s failed:\n%s", section, traceback.format_exc())
                failed.append(section)
                rows.append(Row(section, "section failed", f"{type(err).__name__}: "
                                + " ".join(str(err).split())[:300]))
            durations[section] = time.perf_counter() - start
            log.info("bench: %s took %.1f s", section, durations[section])
        facts = ctx.facts
    facts.append("wall time of the suite: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())
                 + f"; total {sum(durations.values()) / 60:.1f} min.")
    return BenchRun(rows, settings, provenance.environment(), load_before, os.getloadavg()[0], facts,
                    failed)


def cpu_description() -> str:
    """Model name and the AVX-512 / AMX flags of this CPU (Linux), else the platform's name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")]
    return f"{name} ({', '.join(wanted)})" if wanted else name


def document(result: BenchRun, command: str) -> str:
    """The markdown document: provenance, method, the table, notes."""
    s, env = result.settings, result.environment
    mode = ("QUICK mode (tiny sizes, one repeat: checks that the suite runs; its numbers say nothing "
            "about speed)" if s.quick else
            f"full: networks at {s.network.size} px, inference batch {s.batch}, medians of {s.repeats} "
            f"timed repeats ({s.roof_repeats} for the roof) after one warm-up")
    lines = [
        "# Benchmark suite: speed and memory on this machine",
        "",
        f"- command: `{command}`",
        f"- commit: {env['commit']}; date: {env['date']}",
        f"- machine: {env['machine']}, {cpu_description()}; Python {env['python']}, TensorFlow "
        f"{env['tensorflow']}, Keras {env['keras']}",
        f"- load average (1 min) before / after: {result.load_before:.2f} / {result.load_after:.2f} on "
        f"{cpu_count()} cores",
        f"- mode: {mode}",
    ]
    if s.note:
        lines.append(f"- note: {s.note}")
    lines += [
        "- method: every figure is timed in this run beside its reference, interleaved (A, B, A, B, ...) "
        "so that both see the same load; each is the median over the repeats after warm-up. 'CPU used' "
        "is the process's CPU time / wall time / cores while the figure was timed (about 100 % on a quiet "
        "machine; less means other work took the cores, so absolute figures are low, ratios still hold).",
        "",
        markdown_table(result.rows),
        "",
        "## Notes",
        "",
        "- roof: the faster of one n x n x n `tf.linalg.matmul` (2 n^3 FLOPs) and one 3x3 'same' "
        "`tf.nn.conv2d` of VGG16's block-3 shape, per dtype; operands are arguments of a traced function, "
        "one kernel per call (identical matmuls in one graph are merged by grappler). TensorFlow runs a "
        "2-D float32 MatMul through oneDNN's sgemm, a few percent slower per core than oneDNN's direct "
        "convolution, so a matmul alone is below what a 3x3-convolution network reaches. Every network "
        "row is timed interleaved with the roof kernels of its own precision (float32, or bfloat16 for "
        "`mixed_bfloat16`), so its share compares figures taken under the same load.",
        "- models: random weights (speed does not depend on them); FLOPs counted from the layers "
        "(`radlogics_repro.models.count_flops`, ResNet-50 7.7 GFLOP per 224 image); inference is timed "
        "as trained and with BatchNormalization folded into the convolutions (`models.fold_batchnorm`, "
        "as analyze runs the networks; the target applies to that row); a training step counts "
        "3x the forward FLOPs; a training step is `fit` for one step on random examples in memory, with the "
        "model compiled as training compiles it (AdamW, the task's loss and metrics); training batch: the "
        "experiment's "
        + ", ".join(f"{t} {s.train_batch or s.presets[t].batch_size}" for t in s.train_tasks) + ".",
        f"- pipeline: `fit` for {s.pipeline_steps} steps on the training `tf.data` pipeline (slices of "
        "the study, the experiment's batch size, augmentation and precision) vs `fit` on the same batches "
        f"computed beforehand and served from memory; one warm-up step each, median of {s.pipeline_repeats} "
        "interleaved repeats; the network is the models section's (random weights).",
        *[f"- {fact}" for fact in result.facts],
        *[f"- {row.section}, {row.figure}: {note}" for row in result.rows for note in row.notes],
    ]
    if result.failed:
        lines.append(f"- FAILED sections: {', '.join(result.failed)} (see the rows above)")
    return "\n".join(lines) + "\n"


def terminal_table(result: BenchRun) -> str:
    return plain_table(result.rows)
