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


class UnsafeNameError(ValueError):
    """A name from user input (case id, patient id, output name) that is not a plain file name."""


MAX_NAME_BYTES = 200  # below the 255-byte limit of common file systems, leaving room for suffixes


def check_plain_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it can safely name one file or folder inside an output folder.

    A plain name is a non-empty string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes without a
    path separator (``/`` or ``\\``), control characters or a leading dot (``.``, ``..`` and hidden
    names, which the temporary folders of :func:`output_folder` use) and without surrounding
    spaces. So ``parent / name`` always stays directly inside ``parent``.

    Raises:
        UnsafeNameError: one line naming ``what``, the value and the problem.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "empty or not text"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif name.startswith("."):
        problem = "starts with a dot"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    elif name != name.strip():
        problem = "has leading or trailing spaces"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise UnsafeNameError(f"{what} {name!r} cannot name a file or folder: {problem}")
    return name


def child_path(parent: str | os.PathLike, name: object, what: str = "name") -> Path:
    """``parent / name`` for a user-given ``name`` checked by :func:`check_plain_name`."""
    return Path(parent) / check_plain_name(name, what)


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
