"""Shared fixtures: the real-data folder (optional) and one tiny synthetic dataset per session."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("RADLOGICS_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $RADLOGICS_SHARED_DATA); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six synthetic patients at 64 x 64 x 24 (two scanned twice): the manifest path."""
    from radlogics_repro import synth

    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    return synth.generate_dataset(
        out, n_patients=6, seed=11, in_plane=64, slices=24, slice_mm=(4.0, 6.0),
        covid_fraction=0.5, longitudinal_fraction=0.34, timepoints=2, progress=False)
