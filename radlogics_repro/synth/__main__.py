"""``python -m radlogics_repro.synth [key=value ...]``: write a synthetic dataset (conf/synth.yaml).

Exit codes: 0 written; 2 bad configuration or output path (one-line message on stderr).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from radlogics_repro.synth.dataset import generate_dataset
from radlogics_repro.synth.phantom import SynthError

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"  # the same folder as config_path below


@hydra.main(version_base="1.3", config_path="../../conf", config_name="synth")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: plain arguments -> :func:`generate_dataset`."""
    args = OmegaConf.to_container(cfg, resolve=True)
    try:
        manifest = generate_dataset(args.pop("out_dir"), **args)
    except (SynthError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info("dataset manifest: %s", manifest)


def _check_overrides(argv: list[str]) -> None:
    """Compose the config once with the command-line overrides so that a bad key or value
    stops with a one-line message (exit 2) instead of Hydra's multi-line report."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if not a.startswith("-")]
    if len(overrides) != len(argv):  # --help, --cfg, -m ...: let Hydra handle them
        return
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose("synth", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: bad configuration: {first}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _check_overrides(sys.argv[1:])
    main()
