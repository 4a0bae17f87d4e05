"""An exclusive lock on a run directory: two ``compress run`` never write the same ``--out`` at once.

The lock is ``fcntl.flock`` on ``DIR/.compress-run.lock``, taken without waiting; the file holds the
owner's pid so the refused run can name it. The kernel drops the lock when its process dies, so a
killed run (SIGKILL included) never blocks the next ``--resume``. The file is removed on release
(while still locked); a run that opened the old file just then sees, after locking, that the path
no longer names its file and tries again, so two runs can never both hold a lock.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from compress.errors import CompressError

LOCK_NAME = ".compress-run.lock"
_TRIES = 5


def holder_pid(run_dir: Path) -> int | None:
    """The pid written in ``run_dir``'s lock file, or None if there is none (yet)."""
    try:
        text = (run_dir / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """Holds ``run_dir/.compress-run.lock`` locked until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir`` (which must exist) for this process, writing its pid into the lock file.

        Raises:
            CompressError: another process holds the lock (its pid is named), or the folder cannot be written.
        """
        path = run_dir / LOCK_NAME
        for _ in range(_TRIES):
            not_ours = f"{path}: is not compress's lock file (a link, folder, FIFO or device); nothing was touched; remove it"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as exc:
                if os.path.islink(path) or os.path.isdir(path):
                    raise CompressError(not_ours) from None
                raise CompressError(f"{run_dir}: cannot write the run directory ({exc.strerror})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise CompressError(not_ours)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = holder_pid(run_dir)
                holder = f"process {pid}" if pid is not None else "another process"
                raise CompressError(f"{run_dir}: another compress run ({holder}) is using this run directory; "
                                    "wait for it to finish or use another --out") from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(run_dir, fd)
            os.close(fd)  # the previous owner removed the file between our open and our lock: try again
        raise CompressError(f"{run_dir}: could not lock the run directory after {_TRIES} tries; try again")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.run_dir / LOCK_NAME):
            (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
