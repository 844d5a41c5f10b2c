"""Compute throughput: the roof, and both networks' inference and training against it.

The roof is the best FLOP rate TensorFlow's own dense kernels (oneDNN on x86) reach on this CPU, in
float32 and in bfloat16: the faster of one large square matmul (``n x n`` by ``n x n``, ``2 n^3``
FLOPs) and one VGG-shaped 3x3 convolution. A matmul alone is not the roof of a convolutional
network: TensorFlow runs a 2-D float32 MatMul through oneDNN's sgemm, which reaches a few percent
less per core than oneDNN's direct convolution kernels, so a U-Net made of 3x3 convolutions can
run above the matmul figure. Each network figure is timed interleaved with the roof kernels of its
precision (network step, matmul, convolution, network step, ...), so its share of the roof compares
numbers taken under the same load.

Network FLOPs are counted from the layers (:func:`radlogics_repro.models.count_flops`, forward
pass per image); a training step is counted as 3x the forward FLOPs (forward, and a backward pass
of about twice the forward cost: the usual convention).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from radlogics_repro import models, train
from radlogics_repro.bench.timing import Row, Timing, interleaved

ROOF_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}
"""Dtype of the dense kernels that bound a network run under each Keras dtype policy."""

TRAINING_FLOP_FACTOR = 3.0

TASK_NAMES = {"lung_unet": "U-Net", "classifier": "classifier (ResNet-50)"}


@contextlib.contextmanager
def precision(policy: str) -> Iterator[None]:
    """Set the global Keras dtype policy inside the block; the previous one is restored after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def short_dtype(policy: str) -> str:
    return "bfloat16" if "bfloat16" in policy else "float16" if "float16" in policy else "float32"


# ---------------------------------------------------------------------------------------------
# Roof
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """One dense kernel: a name, a blocking call, and the FLOPs of one call."""

    name: str
    call: Callable[[], object]
    flops: float

    def gflops(self, timing: Timing) -> float:
        return timing.rate(self.flops) / 1e9


@dataclass(frozen=True)
class RoofSettings:
    """The roof kernels: square matmuls of these sizes (the largest one counts for the roof) and
    a 3x3 'same' convolution of a (batch, side, side, channels) input to as many channels (default:
    VGG16 block 3 at 224, batch 8)."""

    matmul_sizes: tuple[int, ...] = (2048, 4096)
    conv: tuple[int, int, int] = (8, 56, 256)


@functools.cache
def matmul_kernel(n: int, dtype: tf.DType) -> Kernel:
    """One ``n x n @ n x n`` matmul in ``dtype`` (``2 n^3`` FLOPs); one per (n, dtype) for the whole
    run, traced once. The operands are arguments of the traced function (not captured constants),
    and each call runs exactly one matmul (identical matmuls in one graph would be merged)."""
    generator = tf.random.Generator.from_seed(0)
    a = tf.cast(generator.normal((n, n)), dtype)
    b = tf.cast(generator.normal((n, n)), dtype)
    matmul = tf.function(lambda x, y: tf.linalg.matmul(x, y), autograph=False)
    return Kernel(f"{dtype.name} matmul {n}^3", lambda: matmul(a, b).numpy(), 2.0 * float(n) ** 3)


@functools.cache
def conv_kernel(shape: tuple[int, int, int], dtype: tf.DType) -> Kernel:
    """One 3x3 'same' convolution, ``(batch, side, side, c) -> (batch, side, side, c)``, in
    ``dtype`` (``2 * batch * side^2 * 9 * c^2`` FLOPs)."""
    batch, side, channels = shape
    generator = tf.random.Generator.from_seed(1)
    x = tf.cast(generator.normal((batch, side, side, channels)), dtype)
    w = tf.cast(generator.normal((3, 3, channels, channels)) * 0.02, dtype)
    conv = tf.function(lambda inputs, kernel: tf.nn.conv2d(inputs, kernel, 1, "SAME"), autograph=False)
    flops = 2.0 * batch * side * side * 9 * channels * channels
    return Kernel(f"{dtype.name} 3x3 convolution {batch}x{side}x{side}x{channels}->{channels}",
                  lambda: conv(x, w).numpy(), flops)


def roof_kernels(settings: RoofSettings, policy: str) -> list[Kernel]:
    """The kernels whose best rate is the roof for ``policy``: the largest matmul and the 3x3
    convolution."""
    dtype = ROOF_DTYPES[policy]
    return [matmul_kernel(max(settings.matmul_sizes), dtype), conv_kernel(settings.conv, dtype)]


def best_rate(kernels: Sequence[Kernel], timings: dict[str, Timing]) -> tuple[float, str]:
    """(GFLOP/s, kernel name) of the fastest kernel."""
    return max((k.gflops(timings[k.name]), k.name) for k in kernels)


def without_dtype(kernel_name: str) -> str:
    """'float32 matmul 4096^3' -> 'matmul 4096^3'."""
    return kernel_name.split(" ", 1)[1]


def roof_rows(settings: RoofSettings, policies: Sequence[str], repeats: int
              ) -> tuple[list[Row], dict[str, float]]:
    """GFLOP/s of every matmul size and of the convolution in every dtype, all interleaved, and the
    roof of each dtype (the best of the largest matmul and the convolution); bfloat16's roof is
    also given as a multiple of float32's.

    Returns:
        The rows, and the roof in GFLOP/s per policy.
    """
    kernels = {p: [matmul_kernel(n, ROOF_DTYPES[p]) for n in sorted(settings.matmul_sizes, reverse=True)]
               + [conv_kernel(settings.conv, ROOF_DTYPES[p])] for p in policies}
    timings = interleaved({k.name: k.call for ks in kernels.values() for k in ks}, repeats)
    rows, roofs = [], {}
    for p in policies:
        roofs[p], best = best_rate(roof_kernels(settings, p), timings)
        biggest = kernels[p][0]
        for kernel in kernels[p]:
            row = Row("roof", kernel.name, f"{kernel.gflops(timings[kernel.name]):.0f} GFLOP/s",
                      cpu=timings[kernel.name].cpu_share)
            if kernel is not biggest:
                row.reference = f"{biggest.name}: {biggest.gflops(timings[biggest.name]):.0f} GFLOP/s"
                row.ratio = kernel.gflops(timings[kernel.name]) / biggest.gflops(timings[biggest.name])
                row.ratio_text = f"{row.ratio:.0%}"
            rows.append(row)
        row = Row("roof", f"{short_dtype(p)} roof: the faster of the largest matmul and the convolution",
                  f"{roofs[p]:.0f} GFLOP/s ({without_dtype(best)})")
        if p != policies[0]:
            row.reference = f"{short_dtype(policies[0])} roof {roofs[policies[0]]:.0f} GFLOP/s"
            row.ratio = roofs[p] / roofs[policies[0]]
            row.ratio_text = f"{row.ratio:.2f}x"
        rows.append(row)
    return rows, roofs


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


@dataclass
class NetworkSettings:
    """How to build the two networks for the benchmark (random weights: timing does not depend on
    their values)."""

    size: int = 224
    unet_decoder: tuple[int, ...] = (256, 128, 64, 32)
    classifier_dense: tuple[int, ...] = (256, 64)


class ModelZoo:
    """Builds each (task, policy) network once and hands the same instance to every section."""

    def __init__(self, settings: NetworkSettings):
        self.settings = settings
        self._models: dict[tuple[str, str], keras.Model] = {}
        self._compiled: set[tuple[str, str]] = set()

    def get(self, task: str, policy: str) -> keras.Model:
        key = (task, policy)
        if key not in self._models:
            shape = (self.settings.size, self.settings.size, 3)
            with precision(policy):
                if task == "lung_unet":
                    model = models.build_lung_unet(input_shape=shape, encoder_weights=None,
                                                   decoder_filters=self.settings.unet_decoder)
                else:
                    model = models.build_slice_classifier(input_shape=shape, weights=None,
                                                          dense_units=self.settings.classifier_dense)
            self._models[key] = model
        return self._models[key]

    def compiled(self, task: str, policy: str) -> keras.Model:
        """The network compiled as training compiles it (AdamW, the task's loss and metrics)."""
        model = self.get(task, policy)
        if (task, policy) not in self._compiled:
            with precision(policy):
                train.compile_model(model, task, learning_rate=1e-4, weight_decay=1e-4)
            self._compiled.add((task, policy))
        return model

    def describe(self, task: str) -> str:
        if task == "lung_unet":
            return f"U-Net (decoder {','.join(map(str, self.settings.unet_decoder))})"
        return TASK_NAMES[task]


def inference_call(model: keras.Model, batch: int) -> Callable[[], object]:
    """A blocking forward pass (``training=False``) on ``batch`` random [0, 1] images."""
    x = tf.random.uniform((batch, *model.input_shape[1:]), seed=1)
    forward = tf.function(lambda inputs: model(inputs, training=False), autograph=False)
    return lambda: forward(x).numpy()


def training_examples(task: str, size: int, n: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """``n`` random training examples shaped and typed as the training pipeline yields them:
    images float32 ``(n, size, size, 3)`` in [0, 1], then lung masks float32 ``(n, size, size, 1)``
    (U-Net) or labels float32 ``(n, 1)`` and sample weights float32 ``(n,)`` (classifier)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 3), dtype=np.float32)
    if task == "lung_unet":
        return x, (rng.random((n, size, size, 1)) > 0.5).astype(np.float32)
    return x, (rng.random((n, 1)) > 0.5).astype(np.float32), np.ones(n, np.float32)


def training_call(model: keras.Model, task: str, batch: int) -> Callable[[], object]:
    """One blocking optimiser step: ``fit`` for one step on ``batch`` random examples held in
    memory, batched as the training pipeline batches them (batch dimension None), so that the
    pipeline section's ``fit`` reuses the same traced step."""
    examples = training_examples(task, int(model.input_shape[1]), batch)
    dataset = tf.data.Dataset.from_tensor_slices(examples).batch(batch).repeat()
    return lambda: model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)


FOLDED = "BatchNorm folded"
"""Suffix of an inference variant run as analyze runs it (:func:`radlogics_repro.models.fold_batchnorm`)."""


def _variant(policy: str, folded: bool) -> str:
    return f"{policy}, {FOLDED}" if folded else policy


def network_rows(zoo: ModelZoo, task: str, mode: str, policies: Sequence[str], batch: int,
                 roof: RoofSettings, repeats: int, inference_target: float | None = 0.6) -> list[Row]:
    """Images/s and share of the roof of one network in one mode ('inference' or 'training') under
    every policy; all policies and their roof kernels interleaved in one timing group.

    Inference is timed twice per policy: with the BatchNormalization layers as trained, and with
    them folded into the convolutions, as analyze runs the networks; the target applies to the
    latter. Both count the network's FLOPs as built (the folded copy does the same convolutions).
    """
    fns: dict[str, Callable[[], object]] = {}
    flops: dict[str, float] = {}
    variants: list[tuple[str, str]] = []           # (timing key, policy)
    for policy in policies:
        if mode == "inference":
            model = zoo.get(task, policy)
            forward_flops = float(models.count_flops(model))
            for folded in (False, True):
                key = _variant(policy, folded)
                fns[key] = inference_call(models.fold_batchnorm(model) if folded else model, batch)
                flops[key] = forward_flops
                variants.append((key, policy))
        else:
            model = zoo.compiled(task, policy)
            fns[policy] = training_call(model, task, batch)
            flops[policy] = TRAINING_FLOP_FACTOR * float(models.count_flops(model))
            variants.append((policy, policy))
        fns.update({kernel.name: kernel.call for kernel in roof_kernels(roof, policy)})
    timings = interleaved(fns, repeats)
    rows = []
    for key, policy in variants:
        timing: Timing = timings[key]
        roof_gflops, kernel = best_rate(roof_kernels(roof, policy), timings)
        images_s = timing.rate(batch)
        achieved = images_s * flops[key] / 1e9
        figure = f"{zoo.describe(task)} {mode}, {key}, batch {batch}"
        measured = (f"{images_s:.2f} img/s ({1 / images_s:.3f} s/img); {flops[key] / 1e9:.1f} GFLOP/img"
                    f"{' (3x forward)' if mode == 'training' else ''} -> {achieved:.0f} GFLOP/s")
        row = Row("models", figure, measured,
                  reference=f"{short_dtype(policy)} roof {roof_gflops:.0f} GFLOP/s ({without_dtype(kernel)})",
                  ratio=achieved / roof_gflops, cpu=timing.cpu_share)
        row.ratio_text = f"{row.ratio:.0%} of roof"
        if mode == "inference" and inference_target is not None and key.endswith(FOLDED):
            row.target = f">= {inference_target:.0%} of roof"
            row.met = row.ratio >= inference_target
        rows.append(row)
    if mode == "inference":
        for policy in policies:
            folded, plain = timings[_variant(policy, True)], timings[policy]
            rows.append(Row("models", f"{zoo.describe(task)} inference, {policy}: {FOLDED} speed-up",
                            f"{folded.seconds / batch:.3f} s/img",
                            reference=f"as trained {plain.seconds / batch:.3f} s/img",
                            ratio=plain.seconds / folded.seconds,
                            ratio_text=f"{plain.seconds / folded.seconds:.2f}x"))
        timings = {policy: timings[_variant(policy, True)] for policy in policies}
    base = policies[0]
    for policy in policies[1:]:
        speedup = timings[base].seconds / timings[policy].seconds
        rows.append(Row("models", f"{zoo.describe(task)} {mode}: {policy} speed-up",
                        f"{timings[policy].seconds / batch:.3f} s/img",
                        reference=f"{base} {timings[base].seconds / batch:.3f} s/img",
                        ratio=speedup, ratio_text=f"{speedup:.2f}x"))
    return rows
