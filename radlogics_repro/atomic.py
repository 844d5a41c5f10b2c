"""Writing outputs so that nothing half-written is ever left in place.

A file is written to a temporary sibling and renamed over its target (``os.replace`` is atomic on
one file system); a folder of outputs is built in a temporary sibling folder and renamed into
place when complete. An interrupted run leaves at most a hidden ``.<name>.*.tmp`` sibling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)
    return path


@contextlib.contextmanager
def output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder of outputs in a temporary sibling, then move it to ``out_dir``.

    Yields the temporary folder to write into. On an exception the temporary folder is removed
    and ``out_dir`` is untouched. ``out_dir`` existing is an error (FileExistsError) unless
    ``overwrite``, checked before any work is done.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; choose another output folder or pass "
                              "overwrite=true")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
