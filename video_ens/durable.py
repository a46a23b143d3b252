"""Files that are whole or absent, also after a crash or a full disk: write beside, fsync, rename, fsync the folder.

A rename alone is not enough: ext4 (delayed allocation) and XFS may commit the rename before the file's data, so
after a power loss or a node going down the new name can point at an empty or partial file; and the rename itself
is only durable once the folder holding it is fsynced. Standard library only: the converters and the training
outputs both use this.
"""

from __future__ import annotations

import errno
import os

__all__ = ["fsync_path", "named", "write_atomic"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file (written by other code, e.g. a tar writer) or a folder (after a rename or a new entry in it).

    An error names `path`: on NFS a full disk may only show here, at the fsync of a file whose writes had succeeded.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems (FUSE mounts among them) refuse fsync on a folder with EINVAL; PostgreSQL ignores it too.
        if e.errno != errno.EINVAL or not os.path.isdir(path):
            raise named(e, path) from e
    finally:
        os.close(fd)


def named(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` naming `path` (a failed write() names no file: "[Errno 28] No space left on device" alone)."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror, os.fspath(path))


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` (str as UTF-8): written to a temporary file in the same folder, fsynced, renamed
    over `path`, then the folder fsynced. On any error `path` is left as it was, the temporary file is removed, and
    an OSError (disk full, quota, file-size limit) is raised naming `path`."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise named(e, path) from e
        raise
    fsync_path(folder)
