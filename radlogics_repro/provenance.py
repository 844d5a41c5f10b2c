"""Where a result came from: code version, machine, library versions, date."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path

from radlogics_repro import __version__


def git_commit(cwd: str | Path | None = None) -> str:
    """Short commit of the package's git checkout, ``+dirty`` when it has uncommitted changes;
    ``unknown`` outside a checkout."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               check=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment() -> dict:
    """Package, Python, TensorFlow and Keras versions, machine, date (UTC, ISO 8601)."""
    import keras
    import tensorflow as tf

    return {
        "radlogics_repro": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {platform.system()}, {_cpu_count()} CPU",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
