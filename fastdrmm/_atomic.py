"""Files written all or nothing: :func:`atomic_write` (the model files of :mod:`fastdrmm.io`,
checkpoints, downloads, pictures and the command line's records all go through it).

:func:`atomic_write` writes a temporary file in the destination's directory, flushes and fsyncs
it, then renames it over the destination with :func:`os.replace`: a reader sees the old file or
the new one, never a part. If anything fails (or is interrupted) the temporary file is removed
and an existing file at ``path`` is left as it was.

The temporary file is named ``.<name>.<host>-<pid>.<random>.tmp`` (``<host>``: 6 hex digits of
a hash of the host name, ``<pid>``: the writer's process id). A writer killed outright (SIGKILL,
power loss) cannot remove it, so every write first removes the stale temporary files of the SAME
destination: only names of exactly this pattern, only regular files of the current user, and
only those whose writer (same host) is no longer running or that were not modified for an
hour. Saving over an existing file keeps its permission bits (a new file gets ``0o666`` less
the umask); saving to a symbolic link writes the file it points to (the link stays a link).
The destination must be a regular file or absent: a directory, FIFO or device is refused
before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from pathlib import Path

__all__ = ["atomic_write", "file_kind"]

# a temp file of a live writer on this host is left alone for this long (seconds)
_STALE_TEMP_AGE = 3600.0


def _umask():
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory):
    """Make the rename durable where the platform allows (POSIX); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host_tag():
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _temp_pattern(name, suffix):
    """The names of this module's temp files for destination ``name``: the current form
    ``.NAME.<host>-<pid>.<hex>SUFFIX`` (groups host, pid) and the older ``.NAME.<8>SUFFIX``."""
    return re.compile(rf"\.{re.escape(name)}\.(?:([0-9a-f]{{6}})-([0-9]{{1,10}})\.[0-9a-f]{{12}}|"
                      rf"[a-z0-9_]{{8}}){re.escape(suffix)}\Z")


def _pid_running(pid):
    """Whether process ``pid`` exists on this host (True when unsure)."""
    if os.name != "posix" or pid < 1:
        return True  # os.kill is no probe on Windows; pid 0 would mean the process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # e.g. PermissionError: it exists, it is someone else's
    return True


def _is_stale(match, info, now):
    """Whether a temp file of ours (regex ``match``, ``os.stat_result`` ``info``) is garbage:
    its writer on this host is gone, or nobody touched it for ``_STALE_TEMP_AGE`` seconds."""
    if now - info.st_mtime > _STALE_TEMP_AGE:
        return True
    host, pid = match.group(1), match.group(2)
    if host is None or host != _host_tag():
        return False  # an older name, or another host's writer: by age only
    pid = int(pid)
    return pid != os.getpid() and not _pid_running(pid)


def _remove_stale_temps(directory, name, suffix):
    """Remove the temp files that killed writers left for destination ``name`` (best effort)."""
    pattern = _temp_pattern(name, suffix)
    uid = os.getuid() if hasattr(os, "getuid") else None
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or (uid is not None and info.st_uid != uid):
                continue
            if _is_stale(match, info, now):
                os.unlink(entry.path)
        except OSError:
            continue


def _create_temp(directory, name, suffix):
    """A new temp file beside the destination, created exclusively (mode 0600): (fd, path)."""
    prefix = f".{name}.{_host_tag()}-{os.getpid()}."
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(
        os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, prefix + secrets.token_hex(6) + suffix)
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(directory))


def _destination(path):
    """(the file to replace, its permission bits or None when it does not exist yet).

    A symbolic link is followed to the file it points to, so that the link stays a link; the
    destination must be a regular file or absent, and its directory must exist."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "cannot write a file there: it is a directory",
                                str(path))
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: cannot write a file there: it is not a regular file "
                         f"({file_kind(info.st_mode)})")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: its directory "
                                f"{directory} does not exist", str(directory))
    return target, (None if info is None else stat.S_IMODE(info.st_mode) & 0o777)


@contextlib.contextmanager
def atomic_write(path, suffix=".tmp"):
    """Write ``path`` all or nothing: yields ``(file, temp_path)`` for a temp file beside it.

    When the block ends normally the file is flushed, fsynced, given the mode of the file it
    replaces (a new file: the usual mode of a new file) and renamed over ``path`` (then the
    directory is fsynced); a symbolic link at ``path`` is written through, to the file it
    points to. When the block raises, the temp file is removed and ``path`` is left exactly as
    it was. Stale temp files of ``path`` left by killed writers are removed first (see the
    module docstring). The block may read the temp file by its path (e.g. to verify a
    download) after flushing.
    """
    path = Path(os.fspath(path))
    target, mode = _destination(path)
    directory = target.parent if str(target.parent) else Path(".")
    _remove_stale_temps(directory, target.name, suffix)
    fd, tmp = _create_temp(directory, target.name, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    _fsync_dir(directory)


def file_kind(mode):
    """What a file of this ``st_mode`` is, for messages ("a FIFO", ...)."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")
