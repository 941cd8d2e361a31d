"""Small file helpers shared by the package: atomic writes that keep the permissions a plain
``open()`` would give, and a lock on an output folder naming the process that holds it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["PathLike", "atomic_write", "atomic_path", "folder_lock", "FolderLockedError", "LOCK_FILE", "read_text"]

#: The lock file :func:`folder_lock` keeps in an output folder while it holds it (the owner's pid).
LOCK_FILE = ".ferrolm.lock"


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` would
    set it for a moment, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode_for(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's own, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    a crash never leaves a half-written file where a good one was. The file gets the mode a
    plain ``open()`` would give (the umask for a new file, an existing file's own mode)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (a library's
    ``save(filename)``); on a clean exit the file is synced, given ``open()``'s mode and renamed
    onto ``path``, on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp creates 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class FolderLockedError(OSError):
    """Another process writes into the folder (:func:`folder_lock`)."""


#: Folders this process has locked: path -> (open lock file, depth), so nested users share it.
_held: Dict[str, Tuple[object, int]] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: PathLike) -> Iterator[Path]:
    """Holds an exclusive lock on ``folder`` (created if missing) while the block runs, so two
    runs never write into one output folder. The lock is ``fcntl.flock`` on ``.ferrolm.lock``
    (the kernel drops it when the process dies, so a crash leaves no stale lock); the file
    holds the owner's pid for the message and is removed on release. Re-entrant within a process.

    Raises:
        FolderLockedError: another process holds the lock (the message names its pid).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _held_guard:
        if key in _held:
            f, depth = _held[key]
            _held[key] = (f, depth + 1)
            fresh = False
        else:
            fresh = True
    if fresh:
        f = _acquire(folder / LOCK_FILE)
        with _held_guard:
            _held[key] = (f, 1)
    try:
        yield folder
    finally:
        with _held_guard:
            f, depth = _held[key]
            if depth > 1:
                _held[key] = (f, depth - 1)
            else:
                del _held[key]
                f.close()  # type: ignore[attr-defined]  # closing the file drops the flock


def _acquire(lock: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the folder is not locked
        return open(os.devnull, "w")
    for _ in range(100):
        f = open(lock, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise FolderLockedError(
                f"{lock.parent} is in use by another ferrolm process (pid {owner}, lock file {lock}); "
                "wait for it to finish or pick another output folder"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed while we opened it
            break
        f.close()
    else:
        raise FolderLockedError(f"could not lock {lock.parent}: its lock file keeps changing")
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return _Lock(f, lock)


class _Lock:
    """An open, flocked lock file; :meth:`close` removes it (still holding the lock, so a
    process that opened the old file sees the inode change and retries) and unlocks."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.f.close()


def read_text(path: PathLike) -> str:
    """The UTF-8 text of a data file; invalid UTF-8 is a FormatError naming the file, the line
    and the column (not a bare ``UnicodeDecodeError``)."""
    from .errors import FormatError

    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise FormatError(
            f"{path}:{line}: invalid UTF-8 at column {column} (byte {data[e.start]:#04x}); "
            "data files must be UTF-8 text"
        ) from None
