"""Crash-safe file writing: atomic replace with fsync, JSONL writing, an exclusive lock.

A file written here is either the old one or the complete new one, also
after a power cut: data goes to a temporary name in the same folder, is
flushed and fsynced, renamed over the target, and the folder is fsynced so
the rename itself is durable. An ``OSError`` (disk full, permissions) names
the path and leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tidpo_mlx.errors import TidpoError


class WriteError(TidpoError, OSError):
    """A file could not be written (disk full, permissions); the message names it."""


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"{path}: could not write ({err.strerror or err}); the previous file is unchanged") from None
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: Path, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of MLX arrays atomically.

    MLX reports a failed write (disk full) as a ``RuntimeError`` starting with
    ``[write]``; it is treated as the ``OSError`` it is.
    """
    import mlx.core as mx

    def write(tmp: Path) -> None:
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        except RuntimeError as err:
            if not str(err).startswith("[write]"):
                raise
            raise OSError(str(err)) from None

    atomic_write(path, write)


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    """JSON Lines text, one object per line, UTF-8 kept as is."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(target: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON Lines to a file (atomically, creating its folder) or to stdout (``-``)."""
    text = jsonl_text(records)
    if str(target) == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def cache_root() -> Path:
    """tidpo-mlx's cache: ``$TIDPO_MLX_CACHE``, else ``$XDG_CACHE_HOME/tidpo-mlx``, else ``~/.cache/tidpo-mlx``."""
    root = os.environ.get("TIDPO_MLX_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tidpo-mlx"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing) inside this block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
