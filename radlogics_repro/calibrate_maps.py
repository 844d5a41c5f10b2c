"""Store fixed Grad-CAM map scales in a finished classifier run's model.json.

    python -m radlogics_repro.calibrate_maps classifier_run=runs/classifier/<run> \
        [quantile=0.75] [overwrite=true]

``analysis.map_scale=fixed`` puts every positive slice's Grad-CAM maps on one scale per layer
instead of each slice's own min-max, so that a weak finding keeps a weak map and the Corona Score
grows with the lesion (results/corona_map_scale.md). Training stores these scales with the model
(:func:`radlogics_repro.train.gradcam_map_scales`); this command computes them the same way for a
run trained before that: from the run's own ``config.yaml``, the validation split's slices as
training built them, the slices the classifier calls positive at its stored operating threshold,
and per Grad-CAM layer the ``quantile`` of the per-slice maxima of the logit's raw maps. The model
card is rewritten atomically; scales already there are kept unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from radlogics_repro import RESEARCH_USE_NOTICE, atomic, localize
from radlogics_repro.cli import UserError, exit_on_user_error

log = logging.getLogger(__name__)

_USAGE = ("python -m radlogics_repro.calibrate_maps classifier_run=RUN_DIR [quantile=Q] "
          "[overwrite=true] [batch_size=16]")
_KEYS = {"classifier_run", "quantile", "overwrite", "batch_size"}


class CalibrationError(UserError):
    """The run cannot be calibrated: not a finished classifier run, scales already stored, ..."""


def calibrate_run(run_dir: str | Path, quantile: float = localize.MAP_SCALE_QUANTILE,
                  overwrite: bool = False, batch_size: int = 16) -> dict:
    """Compute the run's fixed Grad-CAM map scales and store them in its model.json.

    Returns:
        the stored ``gradcam_scales`` entry: ``{"quantile", "score", "slices", "layers": {layer:
        scale}}`` (scales in raw logit Grad-CAM units).
    """
    from omegaconf import OmegaConf

    from radlogics_repro import models, train

    run_dir = Path(run_dir)
    card_path, model_path, config_path = (run_dir / name for name in
                                          ("model.json", "model.keras", "config.yaml"))
    for path in (card_path, model_path, config_path):
        if not path.exists():
            raise CalibrationError(f"{path}: not found; classifier_run must be a finished "
                                   "classifier training run folder")
    card = json.loads(card_path.read_text())
    if card.get("task") != "classifier":
        raise CalibrationError(f"{card_path}: task is {card.get('task')!r}, not classifier")
    if card.get("gradcam_scales") and not overwrite:
        raise CalibrationError(f"{card_path}: already has gradcam_scales; pass overwrite=true to "
                               "recompute them")
    plain = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    data_cfg, trainer = plain["data"], plain["trainer"]
    val = train.load_task_slices("classifier", data_cfg, "val",
                                 max_cases=trainer.get("max_cases_per_split"),
                                 cache=bool(trainer.get("cache_slices", True)),
                                 lung_segmenter=train.lung_segmenter_for(data_cfg))
    model = models.load_model(model_path)
    scores = train.predict(model, val.images, batch_size)[:, 0]
    scales = train.gradcam_map_scales(model, val, scores, float(card["operating_threshold"]),
                                      quantile, batch_size)
    if scales is None:
        raise CalibrationError(f"{run_dir}: the classifier calls none of its {len(val)} validation "
                               "slices positive; no scale to take")
    card["gradcam_scales"] = scales
    atomic.write_text(card_path, json.dumps(card, indent=2))
    return scales


def parse_arguments(argv: Sequence[str]) -> dict:
    """``key=value ...`` -> the arguments of :func:`calibrate_run`; CalibrationError on bad input."""
    given = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS:
            raise CalibrationError(f"unknown argument {item!r}; usage: {_USAGE}")
        given[key] = value
    if "classifier_run" not in given:
        raise CalibrationError(f"classifier_run= is required; usage: {_USAGE}")
    try:
        quantile = float(given.get("quantile", localize.MAP_SCALE_QUANTILE))
        batch_size = int(given.get("batch_size", 16))
    except ValueError as err:
        raise CalibrationError(f"{err}; usage: {_USAGE}") from None
    if not 0.0 < quantile <= 1.0 or batch_size < 1:
        raise CalibrationError(f"quantile must be in (0, 1] and batch_size >= 1; usage: {_USAGE}")
    overwrite = given.get("overwrite", "false").lower()
    if overwrite not in ("true", "false"):
        raise CalibrationError(f"overwrite={given['overwrite']!r}: expected true or false")
    return {"run_dir": given["classifier_run"], "quantile": quantile,
            "overwrite": overwrite == "true", "batch_size": batch_size}


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
        scales = calibrate_run(**arguments)
        print(f"stored in {Path(arguments['run_dir']) / 'model.json'}: Grad-CAM map scales "
              f"(quantile {scales['quantile']:g} over {scales['slices']} positive validation "
              f"slices): " + ", ".join(f"{k} {v:.4g}" for k, v in scales["layers"].items()))
        print(RESEARCH_USE_NOTICE)


if __name__ == "__main__":
    main()
