"""Atomic file writes for the whole project, one-line errors when a write fails, and the locks that
keep two writers apart: `hold_lock` (a lock file saying who holds it: run directories, launchers,
tuners) and `locked_directory` (a folder that holds nothing but its data, or a file with companions
such as an exported model's cards: the lock file beside it).

    atomic_write(path, text_or_bytes)            # a small file in one go
    atomic_write(path, writer=lambda f: ...)     # a binary writer callback (torch.save, np.save, ...)
    with atomic_path(path) as tmp: h5py.File(tmp, "w")   # for libraries that open files by name

Every write goes to a temporary file in the target's directory (`.NAME.XXXXXXXX.tmp`), is flushed
and fsynced, then renamed over the target, and the directory entry is fsynced too. So a reader sees
the old file or the new one, never half of one, and a process killed mid-write leaves the old file
intact plus at most one orphan temporary file, which `remove_orphans` recognises by its name.

A failed write (a full disk, a quota, a file-size limit, a read-only file system) removes its
temporary file and raises `DmhpcError` naming the file and the reason, with "nothing written":
the target is untouched. A DmhpcError raised inside the write (an input that cannot be read) also
removes the temporary file, and passes unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterable, Iterator

from dmhpc.errors import DmhpcError

TEMP_SUFFIX = ".tmp"
# Where the file system refused a lock this process took, a second writer is not kept out, and the
# temporary files of its writes in progress look like orphans: `remove_orphans` then spares those
# changed within this many seconds.
LIVE_WRITE_S = 600.0
_locks_refused = False
# What flock fails with on a file system without locks (Lustre without -o flock, NFS without a lock
# manager): the warning's case. Any other error (EIO, ESTALE) is one.
LOCKS_REFUSED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
# `.NAME.XXXXXXXX.tmp`: tempfile's random part is 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `atomic_write`'s temporary files."""
    return bool(_TEMP_NAME.fullmatch(name))


def temporary_of(name: str) -> str | None:
    """The name of the file an `atomic_write` temporary file is written for; None for another name."""
    match = _TEMP_NAME.fullmatch(name)
    return match[1] if match else None


def write_error(path: str | os.PathLike, exc: OSError) -> DmhpcError:
    """The one-line error of a failed write; the disk-full family says so plainly."""
    return DmhpcError(f"{path}: cannot write: {write_reason(exc)}; nothing written")


def write_reason(exc: OSError) -> str:
    """Why a write failed, in words: the disk-full family said plainly."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason} (disk full or over quota)"
    if exc.errno == errno.EFBIG:
        return f"{reason} (file size limit)"
    return reason


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, also when a library raised its own error while handling
    it (torch.save turns a full disk into a RuntimeError about its zip writer). An error raised
    `from None` (or from another cause) disowns the one it was handling: that one is not followed."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc, seen = exc.__cause__ if exc.__suppress_context__ else exc.__context__, seen + 1
    return None


def _file_mode() -> int:
    """0o666 less the umask: what open() would give a new file (mkstemp's 0o600 would hide results
    from the rest of a project group on a shared file system)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # no /proc: read it by setting it, and put it back at once
        os.umask(umask)
    return 0o666 & ~umask


def file_version(st: os.stat_result) -> tuple:
    """What changes when a file (its `os.stat`) is written again or replaced: its device and inode,
    size and modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def fsync_file(path: Path) -> None:
    """Put a written file's data on disk (a full disk or quota on a network file system often says
    so only here: an OSError)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(directory: Path) -> None:
    """Make the renames into `directory` durable (where the file system allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def temporary_path(path: str | os.PathLike) -> Path:
    """A new empty file beside `path` under a temporary name (`.NAME.XXXXXXXX.tmp`), for a write
    that `commit` puts in place; for files committed together (see dmhpc/data/synth.py)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.fchmod(fd, _file_mode())
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    return Path(tmp_name)


def staged_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """A temporary file beside `path` holding `data` (text is UTF-8), on disk: for files the caller
    renames into place together once every one of them is written. Removed again on failure."""
    tmp = temporary_path(path)
    with _removed_on_failure(tmp, path):
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # a full disk on a network file system often says so only here
    return tmp


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """Remove `tmp` when the block fails; the OSError behind a failure is `path`'s one-line write error,
    and a DmhpcError passes unchanged."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, DmhpcError):
            # It names its own file already (an input the block read, a companion file's write):
            # said as `path`'s write error, a missing input sent the user to check the output disk.
            raise
        cause = _os_error(exc)
        if cause is not None:
            raise write_error(path, cause) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, rename it over `path`.

    For writers that open a file by name (h5py, matplotlib). The block must close its file. On any
    error the temporary file is removed; an OSError becomes `path`'s one-line write error, so a block
    that reads other files says their errors itself, as DmhpcErrors (which pass unchanged).
    """
    path = Path(path)
    tmp = temporary_path(path)
    with _removed_on_failure(tmp, path):
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    if durable:
        fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes | None = None, *,
                 writer: Callable[[BinaryIO], None] | None = None, durable: bool = True) -> Path:
    """Write `data` (text is UTF-8) or whatever `writer(file)` writes to `path`, atomically."""
    if (data is None) == (writer is None):
        raise TypeError("atomic_write takes data or writer, not both or neither")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path = Path(path)
    with atomic_path(path, durable=False) as tmp:
        with open(tmp, "wb") as f:
            if writer is not None:
                writer(f)
            else:
                f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    if durable:
        fsync_directory(path.parent)
    return path


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename `source` over `target` (one file system) and make the rename survive a crash."""
    try:
        os.replace(source, target)
    except OSError as exc:
        raise write_error(target, exc) from None
    fsync_directory(Path(target).parent)


def remove_orphans(directory: str | os.PathLike, of: Iterable[str] | None = None) -> tuple[int, int]:
    """Delete the temporary files that killed writes left in `directory` (not below it): all of
    them, or with `of` those of the files of these names only (a catalog's, beside other files).

    Returns (files, bytes) removed. Only names `atomic_write` makes are touched. Call it only
    where no other process can be writing them (under the run's lock, say); where the file system
    refused this process's lock, those changed in the last LIVE_WRITE_S seconds are left (a second
    writer's, in progress: a trainer's checkpoint save failed when an evaluation removed it).
    """
    files = size = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0, 0
    names = None if of is None else set(of)
    recent = time.time() - LIVE_WRITE_S if _locks_refused else math.inf
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and is_temporary(entry.name) and \
                (names is None or temporary_of(entry.name) in names):
            try:
                found = entry.stat()
                if found.st_mtime >= recent:
                    continue
                n = found.st_size
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            files, size = files + 1, size + n
    return files, size


def reserve(fd: int, size: int) -> bool:
    """Allocate `size` bytes of disk for the open file `fd`, so that a full disk or a quota is an
    OSError now rather than a failed (or, through a memory map, fatal SIGBUS) write later. False
    where the file system refuses fallocate even in glibc's emulation: the file is then written
    without a reserve."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


def same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """`a` and `b` name one file or folder, however spelt (data/x, ./data/x, a symlink to it)."""
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """`path` is `folder` or lies below it, however spelt (symlinks resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def locked_directory(directory: Path, user: str) -> Iterator[None]:
    """Hold an exclusive lock for `directory` for the block: a second `user` on it stops with a
    one-line error naming the holder. The lock file lies beside the folder (`.NAME.lock`, removed at
    the block's end; a killed process leaves it, harmless), so the folder holds nothing but its
    data; a lock on the folder itself would be local to one node on NFS, and two jobs on two nodes
    would both get it."""
    # Keyed by the folder itself, not its spelling: a symlink to it must meet the same lock, and
    # "." must not put the lock inside the folder.
    resolved = directory.resolve()
    path = resolved.parent / f".{resolved.name}.lock"
    made: list[Path] = []
    handle = hold_lock(path, f"{directory}: in use by another {user} ({{holder}}); wait for it to end or write "
                             f"elsewhere", user, made=made)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: see hold_lock's check of the inode
        handle.close()
        # A block that failed (bad input) would leave the empty folders made for the lock behind.
        # Only those this process made, and only empty: after success the folder itself is in
        # them, and another writer may have put its own lock there meanwhile.
        remove_empty(made)


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; returns those this call made, nearest first. One at
    a time, so that a folder another process makes meanwhile is never counted as ours (and never
    removed by us). An OSError other than "exists" is raised."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        made.append(folder)
    return made[::-1]


def remove_empty(made: list[Path]) -> None:
    """Remove the folders `make_folders` made (nearest first) while they are empty: a failed writer
    leaves none behind, and a folder someone filled meanwhile stays, with its parents."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


class LockHeld(DmhpcError):
    """`hold_lock` refused: another process holds the lock; `holder` is what its file says."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


def lock_holder(path: Path) -> str | None:
    """Who holds the `hold_lock` lock on `path` now ("pid N on HOST since ..."), or None: free, or no
    such file. Looked at, never taken: the file keeps what its last holder wrote."""
    try:
        handle = open(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read the lock: {exc.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return handle.read().strip() or "another process"
            return None  # a file system that refuses locks: nothing can be known (hold_lock warns)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# A lock refused at once is tried again this many times, 50 ms apart: `lock_holder` takes a shared
# lock for an instant to look, and a free lock looked held to a trainer starting just then.
_BUSY_TRIES = 5


def _flock_exclusive(handle: IO, wait: bool) -> None:
    if wait:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    for attempt in range(_BUSY_TRIES):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or attempt == _BUSY_TRIES - 1:
                raise
            time.sleep(0.05)


def hold_lock(path: Path, refusal: str, second: str, wait: bool = False, made: list[Path] | None = None,
              owner: str = "", note: str = "") -> IO:
    """An OS lock (flock) on the file `path` (created, with its folder) until the returned file is
    closed; it says who holds it. The kernel drops the lock when its process dies, so a killed job
    never blocks the next. Refused (LockHeld) while another process holds it: `refusal` with
    "{holder}" filled in ("pid N on HOST since ...", after "OWNER: " when the holder gave an
    `owner`, followed by ", NOTE" when it gave a `note`); with `wait`, taken when the holder lets
    go instead. `second`
    names what a second holder would be, for the warning where the file system refuses locks (some
    Lustre mounts), and the caller goes on unguarded. `made` gets the folders made for the lock
    file (nearest first), for the caller to remove when they are empty at its end."""
    global _locks_refused
    made = [] if made is None else made
    for attempt in range(100):
        try:
            made[:0] = make_folders(path.parent)
            handle = open(path, "a+")
        except FileNotFoundError as exc:
            # Another holder's release removed the empty folder it had made, between our making
            # sure of it and our open: make it again. A folder still there refuses new files (/proc).
            if not path.parent.is_dir():
                if attempt < 99:
                    continue
                raise DmhpcError(f"{path}: cannot create the folder or the lock: its folder keeps vanishing") from None
            raise DmhpcError(f"{path}: cannot create the lock: {exc.strerror}") from None
        except OSError as exc:
            raise DmhpcError(f"{path}: cannot create the folder or the lock: {exc.strerror}") from None
        try:
            _flock_exclusive(handle, wait)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise LockHeld(refusal.replace("{holder}", holder), holder) from None
            if exc.errno not in LOCKS_REFUSED:  # a failing disk or server: not a run to go on unguarded
                handle.close()
                raise DmhpcError(f"{path}: cannot take the lock: {exc.strerror}") from None
            _locks_refused = True
            print(f"dmhpc: warning: {path}: the file system refuses locks ({exc.strerror}); a second {second} "
                  f"would not be detected (temporary files of the last {LIVE_WRITE_S / 60:.0f} minutes are left "
                  f"as another writer's)", flush=True)
            break
        # A holder that removes its lock file on release (locked_directory) may have done so between
        # our open and our lock: then this lock is on a file nobody else will open; take the new one.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    else:  # every attempt met a holder's release in between: not a state that lasts, but not a lock
        raise DmhpcError(f"{path}: cannot take the lock: its file keeps being replaced")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{owner + ': ' if owner else ''}pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}{', ' + note if note else ''}\n")
        handle.flush()
    except OSError as exc:  # a full disk: the empty file and folders made here would outlive the error
        path.unlink(missing_ok=True)  # before the lock goes, as in locked_directory
        with contextlib.suppress(OSError):
            handle.close()  # flushes the line again, which fails again
        remove_empty(made)
        raise write_error(path, exc) from None
    return handle
