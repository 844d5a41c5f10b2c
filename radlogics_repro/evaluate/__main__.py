"""Evaluation entry point: ``python -m radlogics_repro.evaluate [split=test] [name=...]``.

Runs the trained models (newest finished runs by default) over a manifest split with ground truth
(the synthetic default unless ``data.manifest=...``) and writes to ``results/<name>/``:
``metrics.json`` (all headline numbers with provenance), ``summary.md``, ``cases.csv``,
``slices.csv`` and the plots ``roc.png``, ``lung_dice.png``, ``corona_vs_reference.png`` and
``corona_curves.png``. An existing results folder is not overwritten unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from radlogics_repro import RESEARCH_USE_NOTICE, analyze, atomic, data, provenance
from radlogics_repro.cli import EVALUATE_CONFIG_RULES, check_config, exit_on_user_error
from radlogics_repro.evaluate import plots, runner

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Evaluate as configured; returns metrics.json's content."""
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not cfg.overwrite:  # checked before the long evaluation
        raise FileExistsError(f"{out_dir}: results exist; pass overwrite=true or another name=")
    manifest_path = Path(cfg.data.manifest)
    if cfg.data.get("generate_if_missing"):
        from radlogics_repro import synth

        synth.ensure_dataset(manifest_path, OmegaConf.to_container(cfg.data.generator, resolve=True))
    manifest = data.read_manifest(manifest_path, required=("image", "lung_mask", "lesion_mask"))
    environment = provenance.environment()  # at the start: the code that evaluates
    settings = analyze.settings_from_config(cfg.analysis)
    models = analyze.load_analysis_models(cfg.lung_model, cfg.classifier_model, cfg.paths.runs_dir,
                                          precision=settings.precision)
    evaluation = runner.evaluate_split(manifest, cfg.split, models, settings,
                                       max_cases=cfg.max_cases)
    summary = runner.summarize(evaluation, n_boot=int(cfg.n_boot))
    document = {
        "notice": RESEARCH_USE_NOTICE, "name": cfg.name, "split": cfg.split,
        "command": " ".join(["python -m radlogics_repro.evaluate", *sys.argv[1:]]),
        "data": {"manifest": str(manifest_path), "name": cfg.data.get("name")},
        "models": {"lung": models.lung_path, "lung_init": models.lung_card.get("init"),
                   "classifier": models.classifier_path,
                   "classifier_init": models.classifier_card.get("init")},
        "metrics": summary, "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment,
    }
    with atomic.output_folder(out_dir, cfg.overwrite) as tmp:
        evaluation.cases.to_csv(tmp / "cases.csv", index=False, float_format="%.6g")
        evaluation.slices.to_csv(tmp / "slices.csv", index=False, float_format="%.6g")
        (tmp / "metrics.json").write_text(json.dumps(document, indent=2, default=float))
        plots.roc_figure(evaluation, tmp / "roc.png")
        plots.lung_dice_figure(evaluation, tmp / "lung_dice.png")
        plots.corona_agreement_figure(evaluation, tmp / "corona_vs_reference.png")
        plots.corona_curves_figure(evaluation, tmp / "corona_curves.png")
        (tmp / "summary.md").write_text(plots.summary_markdown(document))
    print((out_dir / "summary.md").read_text())
    return document


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
def main(cfg) -> None:
    with exit_on_user_error():
        check_config(cfg, EVALUATE_CONFIG_RULES)
        run(cfg)


if __name__ == "__main__":
    from radlogics_repro.cli import check_overrides

    check_overrides("evaluate")
    main()
