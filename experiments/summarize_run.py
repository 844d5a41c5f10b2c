"""Write a Markdown summary of one finished training run (for results/).

    python experiments/summarize_run.py runs/classifier/<timestamp>_classifier results/train_classifier.md

Everything in the summary is read from the run folder (metrics.json, history.csv, config.yaml,
train.log): nothing is typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def log_span(run_dir: Path) -> tuple[str, str] | None:
    """First and last timestamps (``YYYY-MM-DD HH:MM:SS``) of the run's train.log, or None."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log.read_text(), flags=re.M)
    return (stamps[0], stamps[-1]) if stamps else None


def run_wall_minutes(run: Path) -> float | None:
    """Minutes between the first and last timestamps of the run's train.log."""
    span = log_span(run)
    if span is None:
        return None
    first, last = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S") for stamp in span)
    return (last - first).total_seconds() / 60


def summarize(run_dir: Path) -> str:
    doc = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    env = doc["environment"]
    lines = [f"# Training run `{run_dir.name}` ({doc['task']})", "", doc["notice"], "",
             f"Command: `python -m radlogics_repro.train +experiment={doc['task']}` "
             f"(resolved config: `config.yaml` of the run); commit "
             f"{env['commit']}; started {env['date']}; {env['machine']}; TensorFlow {env['tensorflow']}, "
             f"Keras {env['keras']}.", "",
             f"- init: **{doc['init']}**",
             f"- data: {doc['data'].get('name')} (`{doc['data'].get('source')}`), slices "
             f"train {doc['slices']['train']}, val {doc['slices']['val']}, test {doc['slices']['test']}",
             f"- epochs run: {len(history)}; operating threshold (val): "
             f"{_fmt(doc['operating_threshold'])}"
             + (f"; case threshold (val): {_fmt(doc.get('case_threshold'))}"
                if doc.get("case_threshold") is not None else "")]
    span = log_span(run_dir)
    if span:
        lines.append(f"- log from {span[0]} to {span[1]}")
    lines += ["", "## Metrics (final model = best validation epoch)", "",
              "| split | metric | value |", "|---|---|---|"]
    for split, values in doc["metrics"].items():
        for key, value in values.items():
            if isinstance(value, dict):
                keep = {k: v for k, v in value.items()
                        if k in ("auc", "threshold", "sensitivity", "specificity", "accuracy", "f1", "n")}
                lines.append(f"| {split} | {key} | "
                             + ", ".join(f"{k} {_fmt(v)}" for k, v in keep.items()) + " |")
            else:
                lines.append(f"| {split} | {key} | {_fmt(value)} |")
    lines += ["", "## History", "", "| " + " | ".join(history.columns) + " |",
              "|" + "---|" * len(history.columns)]
    lines += ["| " + " | ".join(_fmt(float(v)) if isinstance(v, float) else str(v) for v in row)
              + " |" for row in history.itertuples(index=False)]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    text = summarize(Path(argv[0]))
    Path(argv[1]).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
