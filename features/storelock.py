"""One writer at a time per data folder, and files that are either the old or the new version, never half.

The lock is ``flock`` on ``<data>/.hotspots.lock``: the kernel drops it when its process dies (``kill -9``
included), so a crashed writer never leaves the folder locked. Readers take no lock: every write goes to a
unique temporary file beside the target, is fsynced and read back, then atomically replaces the target.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import polars as pl

LOCK_NAME = ".hotspots.lock"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's 0600 would hide the store from other users
TEMP_SUFFIX = ".tmp"
log = logging.getLogger("hotspots.store")


class StoreError(RuntimeError):
    """The store cannot be written or read; the message names the problem and the fix."""


class StoreBusy(StoreError):
    """Another process is writing the data folder and the caller chose not to wait."""


def data_folder(data_dir: str | Path) -> Path:
    """The data folder, created if missing; a clear error when it is a file or cannot be created."""
    folder = Path(data_dir)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"the data folder {folder} is a file, not a folder: pass --data-dir with a folder "
                         f"(it is created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(folder, exc) from None
    return folder


def cannot_write(target: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        fix = "free some disk space and run it again"
    elif exc.errno == errno.ENOTDIR:
        fix = f"a path component of {target} is a file: pass --data-dir with a folder"
    else:
        fix = "make the data folder writable (e.g. chmod -R u+w) or pass --data-dir with a writable folder"
    return StoreError(f"cannot write {exc.filename or target} ({exc.strerror or exc}): {fix}; nothing was changed.")


class _FolderLock:
    """Re-entrant within a process (one flock per folder per process: a second open file of the same lock
    would wait for the first), exclusive across processes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.fd: int | None = None
        self.depth = 0
        self.mutex = threading.RLock()

    def try_acquire(self) -> bool:
        if self.depth:
            self.depth += 1
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd, self.depth = fd, 1
        return True

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd, self.depth = fd, 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


_LOCKS: dict[Path, _FolderLock] = {}
_LOCKS_GUARD = threading.Lock()


def _holder_path(folder: Path) -> Path:
    return folder / (LOCK_NAME + ".holder")


def _holder(folder: Path) -> str:
    """Who holds the lock, as the holder wrote it (best effort: only shown in the waiting message)."""
    try:
        info = json.loads(_holder_path(folder).read_text())
        return f" (pid {info['pid']}: {info['what']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return ""


@contextmanager
def write_lock(data_dir: str | Path, *, wait: bool = True, on_wait: Callable[[str], None] | None = None,
               what: str = "a write") -> Iterator[Path]:
    """Hold the data folder's writer lock. A second writer waits (after telling ``on_wait`` why) or, with
    ``wait=False``, raises StoreBusy. Yields the folder."""
    folder = data_folder(data_dir)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(folder.resolve(), _FolderLock(folder.resolve()))
    with lock.mutex:  # threads of one process take turns too
        try:
            got = lock.try_acquire()
            if not got:
                message = f"the data folder {folder} is being written by another process{_holder(folder)}"
                if not wait:
                    raise StoreBusy(f"{message}: run again when it has finished, or without --no-wait to wait "
                                    f"for it.")
                (on_wait or log.warning)(f"{message}; waiting for it to finish (--no-wait refuses instead)")
                lock.acquire()
        except OSError as exc:
            raise cannot_write(folder, exc) from None
        try:
            if lock.depth == 1:
                _claim(folder, what)
            yield folder
        finally:
            lock.release()


def _claim(folder: Path, what: str) -> None:
    """Note who holds the lock, and remove temporary files of writers that died: only lock holders write them,
    so with the lock held none of them is in use."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        _holder_path(folder).write_text(json.dumps({"pid": os.getpid(), "what": what, "since": stamp}))
    except OSError as exc:
        raise cannot_write(folder, exc) from None
    for stale in stale_temp_files(folder):
        stale.unlink(missing_ok=True)


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files left by interrupted writes (``.<name>.<random>.tmp`` beside their target)."""
    patterns = ("incidents/.*.tmp", "incidents/*/.*.tmp", "incidents/*/month=*/.*.tmp", "revisions/.*.tmp",
                "quarantine/*/.*.tmp", "profiles/.*.tmp")
    return sorted(p for pattern in patterns for p in folder.glob(pattern))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _replaced(path: Path, mode: int | None = FILE_MODE) -> Iterator[tuple[Path, int]]:
    """A unique temporary file beside ``path`` (yielded as (path, fd) for the caller to write, fsync and close),
    then an atomic replace of ``path`` and an fsync of the folder: a reader or a crash sees the old or the new file,
    never a torn one. Any failure removes the temporary file; an OSError becomes a StoreError naming the fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    tmp = Path(name)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        yield tmp, fd
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_synced(fd: int, write: Callable[[IO], object], text: bool = False) -> None:
    with (os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")) as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """The same guarantee for a small file (JSON, .npy): unique temporary file, fsync, atomic replace."""
    with _replaced(path) as (_, fd):
        _write_synced(fd, lambda fh: fh.write(data))


def atomic_write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Write a unique temporary file beside ``path``, fsync it, read it back, then atomically replace ``path``
    and fsync the folder: a reader or a crash sees the old or the new file, never a torn one."""
    with _replaced(path) as (tmp, fd):
        _write_synced(fd, lambda fh: frame.write_parquet(fh, compression="zstd", statistics=True))
        try:
            back = pl.read_parquet(tmp)
        except pl.exceptions.PolarsError as exc:
            raise StoreError(f"the new version of {path} did not read back ({exc}): the old version is kept; "
                             f"check the disk and run it again.") from None
        if back.height != frame.height or back.schema != frame.schema:
            raise StoreError(f"the new version of {path} did not read back as written ({back.height:,} of "
                             f"{frame.height:,} rows): the old version is kept; check the disk and run it again.")


def atomic_write_text(text: str, path: Path) -> None:
    """The text-file twin of :func:`atomic_write_parquet` (remembered profiles): temp file, fsync, replace."""
    with _replaced(path, mode=None) as (_, fd):
        _write_synced(fd, lambda fh: fh.write(text), text=True)
