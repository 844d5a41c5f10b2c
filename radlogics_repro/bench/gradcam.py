"""Grad-CAM per image for both engines of :mod:`radlogics_repro.localize`.

Both engines run interleaved on the same batch of random [0, 1] images through the same float32
slice classifier (random weights: timing does not depend on them). One call is the whole
``gradcam_maps``: probabilities, both layers' raw maps, normalisation and the fused fine map.
"""

from __future__ import annotations

import numpy as np

from radlogics_repro.bench.compute import ModelZoo
from radlogics_repro.bench.timing import Row, interleaved
from radlogics_repro.localize import ENGINES, gradcam_maps
from radlogics_repro.models import GRADCAM_LAYERS


def gradcam_rows(zoo: ModelZoo, *, batch: int, repeats: int, policy: str = "float32") -> list[Row]:
    """One row per engine (s/image); the fused engine's row has tf-keras-vis as its reference."""
    model = zoo.get("classifier", policy)
    size = int(model.input_shape[1])
    images = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    results = {}

    def call(engine):
        results[engine] = gradcam_maps(model, images, engine=engine, batch_size=batch)

    timings = interleaved({engine: (lambda engine=engine: call(engine)) for engine in ENGINES}, repeats)
    fused, reference = results["fused"], results["tf-keras-vis"]
    difference = max([float(np.abs(fused.normalized[n] - reference.normalized[n]).max())
                      for n in GRADCAM_LAYERS] + [float(np.abs(fused.fine - reference.fine).max())])
    per_image = {engine: timings[engine].seconds / batch for engine in ENGINES}
    speedup = per_image["tf-keras-vis"] / per_image["fused"]
    figure = f"Grad-CAM {{}} engine, {policy} classifier at {size} px, batch {batch}"
    return [
        Row("gradcam", figure.format("fused (one forward+backward pass)"),
            f"{per_image['fused']:.3f} s/img",
            reference=f"tf-keras-vis {per_image['tf-keras-vis']:.3f} s/img", ratio=speedup,
            ratio_text=f"{speedup:.2f}x faster", cpu=timings["fused"].cpu_share,
            notes=[f"max |difference| of the two engines' maps: {difference:.1e}"]),
        Row("gradcam", figure.format("tf-keras-vis"), f"{per_image['tf-keras-vis']:.3f} s/img",
            cpu=timings["tf-keras-vis"].cpu_share),
    ]
