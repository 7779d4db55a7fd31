"""File helpers shared by every package: content hashes and atomic writes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def absolute(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded, made absolute against the working directory (symlinks kept).

    Every path that enters the program (command line, study file, app config, environment) passes
    through here once, where it enters; components below receive absolute paths only.
    """
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a sibling temporary file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a sibling temporary file (unique per process), then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
