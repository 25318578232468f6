"""Write a file atomically: a crash leaves the old file or the new one, never a mix."""
import os
import tempfile


def write_atomically(path, write, suffix=""):
    """Call ``write(f)`` on a temporary binary file beside `path`, flush and fsync it, rename
    it over `path` (atomic on POSIX) and fsync the folder so the rename itself is durable.

    Raises FileNotFoundError, naming the folder, when the folder does not exist; on any
    error the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the folder {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory):
    # Makes a rename durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
