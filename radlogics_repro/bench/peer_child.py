"""Child process of the benchmark's peer section: lungmask's R231 U-Net on the benchmark study.

    python -m radlogics_repro.bench.peer_child --hu HU.npy [--slices N] [--batch 20] --json RESULT.json

Needs the optional ``bench`` extra (``lungmask`` and PyTorch, CPU build). lungmask downloads its
weights at run time, which a machine without internet cannot do, so the R231 network is built with
the architecture ``lungmask.mask.get_model`` gives it (U-Net, depth 5, 64 first filters, batch norm,
bilinear up-sampling, 3 classes) and random weights, saved, and loaded through lungmask's own
``LMInferer`` like a downloaded file. ``LMInferer.apply`` then runs lungmask's whole path on the HU
volume: per-slice body crop and resampling to 256 x 256, the network in batches, and its 3D
post-processing. Network time (summed over its forward calls) is measured with forward hooks;
FLOPs per slice are counted with ``torch.utils.flop_counter`` on one slice afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from radlogics_repro.bench.timing import own_peak_rss_bytes

PEER_INPUT = 256
"""lungmask resamples every slice's body crop to 256 x 256."""


def r231_network(seed: int = 0):
    """lungmask's R231 architecture with random weights (eval mode)."""
    import torch
    from lungmask.resunet import UNet

    torch.manual_seed(seed)
    return UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True,
                residual=False).eval()


def network_gflop_per_slice(network) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.zeros(1, 1, PEER_INPUT, PEER_INPUT))
    return counter.get_total_flops() / 1e9


def run_lungmask(hu: np.ndarray, batch: int) -> dict:
    """Time ``LMInferer.apply`` on ``hu`` (z, y, x) with a random-weight R231 network."""
    import torch
    from lungmask import LMInferer

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "unet_r231_random.pth"
        torch.save(r231_network().state_dict(), weights)
        inferer = LMInferer(modelpath=str(weights), force_cpu=True, batch_size=batch, tqdm_disable=True)
    network = inferer.model
    with torch.inference_mode():  # warm-up: one batch through the network (oneDNN primitives)
        network(torch.zeros(min(batch, hu.shape[0]), 1, PEER_INPUT, PEER_INPUT))
    clock = {"network_s": 0.0, "calls": 0}

    def before(module, inputs):
        clock["start"] = time.perf_counter()

    def after(module, inputs, output):
        clock["network_s"] += time.perf_counter() - clock["start"]
        clock["calls"] += 1

    network.register_forward_pre_hook(before)
    network.register_forward_hook(after)
    start = time.perf_counter()
    mask = inferer.apply(hu)
    total = time.perf_counter() - start
    return {"total_s": total, "network_s": clock["network_s"], "network_calls": clock["calls"],
            "slices": int(hu.shape[0]), "shape": list(hu.shape), "batch": batch,
            "gflop_per_slice": network_gflop_per_slice(network), "threads": torch.get_num_threads(),
            "lung_voxels": int(np.count_nonzero(mask)), "torch": torch.__version__,
            "lungmask": metadata.version("lungmask")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hu", required=True, help="float32 (z, y, x) HU volume, .npy")
    parser.add_argument("--slices", type=int, default=None,
                        help="use this many evenly spaced slices (default: all)")
    parser.add_argument("--batch", type=int, default=20, help="lungmask's batch size (its default 20)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    hu = np.load(args.hu)
    if args.slices and args.slices < hu.shape[0]:
        hu = hu[np.linspace(0, hu.shape[0] - 1, args.slices).round().astype(int)]
    result = run_lungmask(hu, args.batch)
    result["peak_rss_bytes"] = own_peak_rss_bytes()
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
