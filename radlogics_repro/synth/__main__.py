"""``python -m radlogics_repro.synth [key=value ...]``: write a synthetic dataset (conf/synth.yaml).

Exit codes: 0 written; 2 bad configuration or output path (one-line message on stderr).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from radlogics_repro.cli import check_overrides
from radlogics_repro.synth.dataset import generate_dataset
from radlogics_repro.synth.phantom import SynthError

log = logging.getLogger(__name__)


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


if __name__ == "__main__":
    check_overrides("synth")
    main()
