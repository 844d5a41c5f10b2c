"""The lung U-Net's decoder width: Dice against compute, one table (results/lung_decoder_sweep.md).

    python experiments/lung_decoder_sweep.py \
        --run runs/lung_unet/<run with decoder A> --run runs/lung_unet/<run with decoder B> \
        --holdout results/lung_dice_holdout_all.csv:preset --holdout results/lung_dice_decoder256.csv:d256 \
        [--decoders 512,256,128,64 256,128,64,32 128,64,32,16 64,32,16,8] [--repeats 3] \
        [--out results/lung_decoder_sweep.md]

For every decoder in ``--decoders`` the VGG16-encoder U-Net is built at 224 x 224 (random weights:
speed does not depend on them) and measured in this one process: forward GFLOP per slice
(:func:`radlogics_repro.models.count_flops`), parameters, and inference slices/s at batch 16 in
float32 and in mixed_bfloat16 (``analyze``'s precision on CPUs with native bfloat16), the decoders
timed alternately (median of ``--repeats`` rounds after a warm-up) so that machine noise hits them
alike. For each trained ``--run`` the table adds its decoder's Dice: validation and test Dice
pooled over slices (the run's metrics.json), and whole-scan Dice on held-out scans from a
:mod:`lung_dice` per-scan CSV (``CSV:MODEL`` picks the rows of that model name); the training
wall time comes from the run's train.log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lung_dice import produced_by, refuse_existing, script_start  # noqa: E402
from summarize_run import run_wall_minutes  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, atomic, models  # noqa: E402
from radlogics_repro.bench import timing  # noqa: E402
from radlogics_repro.evaluate.plots import format_value as _fmt  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402
from radlogics_repro.evaluate.runner import SEVERE_INVOLVEMENT  # noqa: E402

SIZE, BATCH = 224, 16


def decoder_text(filters) -> str:
    return ",".join(str(int(f)) for f in filters)


def measure_decoders(decoders: list[tuple[int, ...]], repeats: int) -> pd.DataFrame:
    """GFLOP, parameters and slices/s (float32, mixed_bfloat16) of each decoder at 224, batch 16."""
    import keras

    images = np.random.default_rng(0).random((BATCH, SIZE, SIZE, 3), np.float32)
    nets, rows = {}, []
    for filters in decoders:
        keras.mixed_precision.set_global_policy("float32")
        net = models.build_lung_unet((SIZE, SIZE, 3), encoder_weights=None, decoder_filters=filters)
        rows.append({"decoder": decoder_text(filters), "GFLOP / slice": models.count_flops(net) / 1e9,
                     "parameters (M)": net.count_params() / 1e6})
        for policy in ("float32", "mixed_bfloat16"):
            nets[(decoder_text(filters), policy)] = models.with_compute_precision(net, policy)
    calls = {key: (lambda n=net: n.predict_on_batch(images)) for key, net in nets.items()}
    timings = timing.interleaved(calls, repeats=repeats)
    table = pd.DataFrame(rows)
    for policy in ("float32", "mixed_bfloat16"):
        table[f"slices/s {policy}"] = [timings[(d, policy)].rate(BATCH) for d in table["decoder"]]
    return table


def trained_rows(runs: list[Path], holdouts: list[tuple[Path, str]]) -> pd.DataFrame:
    """Per trained run: decoder, pooled val/test Dice, whole-scan held-out Dice, training minutes."""
    rows = []
    for run, (csv, model_name) in zip(runs, holdouts, strict=True):
        config = yaml.safe_load((run / "config.yaml").read_text())
        metrics = json.loads((run / "metrics.json").read_text())["metrics"]
        mine = pd.read_csv(csv)
        mine = mine[mine["model"] == model_name]
        if mine.empty:
            raise SystemExit(f"error: {csv} has no rows of model {model_name!r}")
        severe = mine.loc[mine["severe"].astype(bool), "lung_dice"]
        rows.append({"decoder": decoder_text(config["model"]["decoder_filters"]), "run": run.name,
                     "val Dice (pooled)": metrics["val"]["dice_pooled"],
                     "test Dice (pooled)": metrics.get("test", {}).get("dice_pooled"),
                     "held-out scans": len(mine), "held-out mean Dice": mine["lung_dice"].mean(),
                     "held-out min Dice": mine["lung_dice"].min(),
                     f"severe (>= {SEVERE_INVOLVEMENT:.0%}) mean Dice (n)":
                         f"{_fmt(severe.mean())} ({len(severe)})" if len(severe) else "-",
                     "training min": run_wall_minutes(run)})
    return pd.DataFrame(rows)


def holdout_spec(text: str) -> tuple[Path, str]:
    path, sep, name = text.rpartition(":")
    if not sep or not path or not name:
        raise argparse.ArgumentTypeError(f"--holdout must be CSV:MODEL, got {text!r}")
    return Path(path), name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", type=Path, default=[], help="a trained lung_unet run")
    parser.add_argument("--holdout", action="append", type=holdout_spec, default=[],
                        help="lung_dice per-scan CSV:MODEL, one per --run, same order")
    parser.add_argument("--decoders", nargs="+",
                        default=["512,256,128,64", "256,128,64,32", "128,64,32,16", "64,32,16,8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/lung_decoder_sweep.md")
    args = parser.parse_args(argv)
    if len(args.run) != len(args.holdout):
        parser.error("give one --holdout CSV:MODEL per --run")
    out = Path(args.out)
    if refuse_existing(out):
        return 2
    started = script_start()
    decoders = [tuple(int(f) for f in text.split(",")) for text in args.decoders]
    compute = measure_decoders(decoders, args.repeats)
    print(compute.to_string(index=False), flush=True)
    trained = trained_rows(args.run, args.holdout)
    table = compute.merge(trained, on="decoder", how="left") if len(trained) else compute
    table = table.astype(object).where(table.notna(), "-")  # "-": this decoder was not trained
    for column, spec in {"GFLOP / slice": ".1f", "parameters (M)": ".1f", "slices/s float32": ".2f",
                         "slices/s mixed_bfloat16": ".2f", "training min": ".1f", "held-out scans": ".0f"
                         }.items():
        if column in table:
            table[column] = [v if v == "-" else format(v, spec) for v in table[column]]
    lines = [
        "# Lung U-Net decoder width: Dice against compute", "", f"_{RESEARCH_USE_NOTICE}_", "",
        produced_by("lung_decoder_sweep.py", argv, started), "",
        f"Compute columns: measured in this run at {SIZE} x {SIZE}, batch {BATCH}, decoders timed "
        f"alternately, median of {args.repeats} rounds after a warm-up. Dice columns: the trained runs "
        "named in the table (pooled Dice from their metrics.json; whole-scan Dice on held-out scans "
        "from the lung_dice CSVs given on the command line); training min: first to last line of "
        "the run's train.log. '-': that decoder was not trained.", "",
        frame_markdown(table), ""]
    atomic.write_text(out, "\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
