"""Benchmark suite entry point (Hydra, ``conf/bench.yaml``).

    python -m radlogics_repro.bench                                # full suite -> results/bench.md
    python -m radlogics_repro.bench quick=true                     # tiny sizes, seconds
    python -m radlogics_repro.bench sections=[roof,models] out=/tmp/bench.md

Prints the table and writes the markdown document (command, commit, date, machine, table, notes).
Training settings the suite mirrors (batch sizes, precision, augmentation, U-Net decoder) come from
the experiments ``conf/experiment/lung_unet.yaml`` and ``classifier.yaml``. Exit code 1 when a
section failed (the others are still measured and written).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from radlogics_repro import atomic
from radlogics_repro.bench import compute, suite

log = logging.getLogger(__name__)


def training_presets() -> dict[str, suite.TaskPreset]:
    """Batch size, precision (``auto`` resolved for this machine), augmentation and architecture of
    each task's experiment, composed with Hydra (needs an initialised Hydra: inside the app, or
    ``initialize_config_module``)."""
    from hydra import compose

    from radlogics_repro.train import training_precision

    presets = {}
    for task in suite.TASKS:
        cfg = compose(config_name="train", overrides=[f"+experiment={task}"])
        model = cfg.model
        presets[task] = suite.TaskPreset(
            batch_size=int(cfg.trainer.batch_size), precision=training_precision(str(cfg.trainer.precision)),
            augment=OmegaConf.to_container(cfg.augment, resolve=True),
            decoder_filters=tuple(model.decoder_filters) if task == "lung_unet" else None,
            dense_units=tuple(model.dense_units) if task == "classifier" else None)
    return presets


def settings_from_config(cfg: DictConfig) -> suite.BenchSettings:
    """``conf/bench.yaml`` (composed) -> plain :class:`suite.BenchSettings`."""
    sections = tuple(str(s) for s in cfg.sections)
    unknown = [s for s in sections if s not in suite.SECTIONS]
    if unknown:
        raise suite.BenchError(f"sections={list(sections)}: unknown {unknown}; choose from "
                               f"{list(suite.SECTIONS)}")
    values = {"sections": sections, "runs_dir": str(cfg.paths.runs_dir), "note": str(cfg.note or ""),
              "lung_model": cfg.lung_model, "classifier_model": cfg.classifier_model}
    if cfg.repeats is not None:
        values["repeats"] = int(cfg.repeats)
    if not cfg.quick:   # null: every slice; quick keeps its own tiny size
        values["peer_slices"] = None if cfg.peer_slices is None else int(cfg.peer_slices)
    presets = training_presets()
    if cfg.quick:
        return suite.quick_settings(presets, **values)
    network = compute.NetworkSettings(unet_decoder=presets["lung_unet"].decoder_filters,
                                      classifier_dense=presets["classifier"].dense_units)
    return suite.BenchSettings(presets=presets, network=network, **values)


def output_path(cfg: DictConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("outputs/bench_quick.md") if cfg.quick else Path("results/bench.md")


def run(cfg: DictConfig, command: str) -> suite.BenchRun:
    """Run the suite for a composed config, print the table and write the document."""
    settings = settings_from_config(cfg)
    out = output_path(cfg)
    result = suite.run(settings)
    print(suite.terminal_table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, suite.document(result, command))
    print(f"wrote {out}")
    return result


def main() -> None:
    import hydra

    from radlogics_repro.cli import check_overrides, exit_on_user_error

    check_overrides("bench")

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
    def _main(cfg: DictConfig) -> None:
        with exit_on_user_error():
            result = run(cfg, " ".join(["python -m radlogics_repro.bench", *sys.argv[1:]]))
        if result.failed:
            sys.exit(1)

    _main()


if __name__ == "__main__":
    main()
