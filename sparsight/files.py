"""File helpers shared by every package: absolute paths, content hashes and atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


def json_digest(obj, length: int = 64) -> str:
    """The sha256 hex digest (its first ``length`` characters) of ``obj`` as sorted-key JSON (non-JSON values
    as ``str``): the one fingerprint of settings and inputs that decides whether stored work is reused."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def stable_int(text: str, nbytes: int = 8, byteorder: str = "little") -> int:
    """A non-negative integer from the sha256 of ``text`` (its first ``nbytes`` bytes): a seed that depends on
    what it is for alone, the same on every machine and Python (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:nbytes], byteorder)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_write(path) as tmp:`` write ``tmp``; on success it is renamed over ``path`` in one
    step, on an error it is removed and ``path`` keeps its old content.

    The temporary file is a hidden sibling named per process and thread, so concurrent writers of one
    path never share it; readers see the old file or the new one, never a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_frame(frame, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame atomically: CSV for a ``.csv`` path, else Parquet (no index)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    return path


#: File name endings of weight files (any case).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


def looks_like_path(value: str) -> bool:
    """Whether a setting such as ``model.weights`` names a file rather than a registered name (a path separator,
    a leading ``~`` or ``.``, a weight file's ending, or an existing file)."""
    return ("/" in value or os.sep in value or value.startswith(("~", ".")) or value.lower().endswith(WEIGHT_SUFFIXES)
            or Path(value).exists())
