"""One writer at a time: an exclusive lock on a folder, held by the process that writes it.

The lock is ``flock`` on ``FOLDER/.storypipe.lock``. The kernel releases it when its process ends, however
it ends (``kill -9`` included), so a lock left by a killed process never blocks anyone: the next writer
takes it at once. The file holds the holder's PID for the error a second writer gets, and is removed when
the lock is released, so a finished folder holds no lock file.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from pipeline.errors import DataError, StorypipeError

LOCK_FILE = ".storypipe.lock"
LOCK_FILE_MODE = 0o666  # as open() would create it; the umask takes away the rest


class FolderInUse(StorypipeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(folder):`` holds ``folder``'s exclusive lock, or raises :class:`FolderInUse` at once.

    The folder must exist. Locks are per open file, so one process must not take the same folder's lock
    twice (the second attempt reports the process itself as the holder).
    """

    def __init__(self, folder: Path, what: str = "story") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        while self._fd is None:
            fd = self._open()
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: no other process can be holding this file
        finally:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def _take(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            holder = holder if holder.isdigit() else "unknown"  # never echo what someone else wrote there
            raise FolderInUse(
                f"{self.what} {self.folder} is in use by process {holder}; wait for it to finish (or stop it), "
                "then run the command again"
            ) from None
        # The previous holder removes the file as it lets go: if it did so between our open and our lock,
        # we hold a lock on a file nobody else will find, so start again with the new one.
        if not self._still_the_lock_file(fd):
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()

    def _open(self) -> int:
        try:  # O_NOFOLLOW: a lock file planted as a symbolic link must not create or truncate a file elsewhere
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, LOCK_FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError(
                    f"{self.path} is a symbolic link; remove it (storypipe's lock file is a plain file)"
                ) from exc
            raise DataError(f"cannot write into {self.folder}: {exc.strerror}") from exc

    def _still_the_lock_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False
