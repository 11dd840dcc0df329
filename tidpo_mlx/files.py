"""Crash-safe file writing: atomic replace with fsync, JSONL writing, exclusive locks.

A file written here is either the old one or the complete new one, also
after a power cut: data goes to a temporary name in the same folder, is
flushed and fsynced, renamed over the target, and the folder is fsynced so
the rename itself is durable. An ``OSError`` (disk full, permissions) names
the path and leaves the old file in place; a full disk is named as such,
with the space the write needs and the space left (:func:`space_note`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tidpo_mlx.errors import TidpoError


class WriteError(TidpoError, OSError):
    """A file could not be written (disk full, permissions); the message names it.

    ``no_space``: the write failed for want of space (the message then says how much it needs);
    ``path``: the file or folder that failed.
    """

    def __init__(self, message: str, no_space: bool = False, path: Path | None = None):
        super().__init__(message)
        self.no_space = no_space
        self.path = path


def size_text(n: int) -> str:
    """A byte count for messages, in decimal units: ``812 B``, ``64 kB``, ``2.4 MB``, ``1.3 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def free_bytes(folder: Path) -> int | None:
    """Bytes a non-root user could still write in ``folder``'s filesystem (None: the folder is not there)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def no_space(err: BaseException, folder: Path, needed: int | None) -> bool:
    """Whether a failed write ran out of space: ``ENOSPC`` or ``EDQUOT``, or (MLX reports a failed write
    without an errno) fewer bytes free in ``folder`` than the write ``needed``."""
    if isinstance(err, WriteError):
        return err.no_space
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    free = free_bytes(folder)
    return needed is not None and free is not None and free < needed


def space_note(folder: Path, needed: int | None, what: str = "it") -> str:
    """``no space left on device: it needs 2.4 MB, 1.0 MB free in <folder>`` (measured now)."""
    free = free_bytes(folder)
    need = f"{what} needs {size_text(needed)}, " if needed is not None else ""
    have = f"{size_text(free)} free" if free is not None else "free space unknown"
    return f"no space left on device: {need}{have} in {folder}"


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


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync it, rename it to ``path``.

    ``size``: the bytes the file takes, named in the error when the disk is full.
    """
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
        full = no_space(err, path.parent, size)
        reason = space_note(path.parent, size) if full else err.strerror or err
        raise WriteError(f"{path}: could not write ({reason}); the previous file is unchanged", full, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), len(data))


def safetensors_bytes(arrays: dict[str, Any]) -> int:
    """The size of the arrays' data in a safetensors file (the JSON header adds a little)."""
    return sum(a.nbytes for a in arrays.values())


def atomic_save_safetensors(path: Path, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of MLX arrays atomically.

    MLX reports a failed write (disk full) as a ``RuntimeError`` starting with
    ``[write]`` and without an errno; it is treated as the ``OSError`` it is,
    and as a full disk when less space is left than the arrays take.
    """
    import mlx.core as mx

    def write(tmp: Path) -> None:
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        except RuntimeError as err:
            if not str(err).startswith("[write]"):
                raise
            raise OSError(str(err)) from None

    atomic_write(path, write, safetensors_bytes(arrays))


def append_line(path: Path, line: str) -> None:
    """Append one line to a text file in a single write; on failure the file is cut back to what it held,
    so a full disk leaves no torn line."""
    data = (line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteError(f"{path}: could not append a record ({err.strerror or err})", path=path) from None
    try:
        before = os.fstat(fd).st_size
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as err:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
        full = no_space(err, path.parent, len(data))
        reason = space_note(path.parent, len(data), "the record") if full else err.strerror or err
        raise WriteError(f"{path}: could not append a record ({reason}); the records before it are kept", full,
                         path) from None
    finally:
        os.close(fd)


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


class FileLock:
    """An exclusive ``flock`` on a lock file, taken without waiting and held until :meth:`release`.

    The kernel frees the lock when the holder's descriptor closes, so a
    killed process's lock frees itself (its file stays, unlocked, and is
    taken over). The file records the holder's process id for messages;
    :meth:`release` removes it while still holding the lock, and :meth:`take`
    checks that the file it locked is still the one at ``path``.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, path: Path) -> "FileLock | None":
        """The lock on ``path`` (created if missing), or None when another holder has it."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise WriteError(f"{path}: could not create the lock file ({err.strerror or err})", path=path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd)
            os.close(fd)  # the holder released and removed it between our open and flock: take the new one

    @staticmethod
    def holder(path: Path) -> str:
        """Who holds the lock on ``path``, for messages: ``process 1234`` (or ``another process``)."""
        try:
            pid = path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        """Remove the lock file and free the lock (a second call does nothing)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = -1


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
