"""Write a file atomically: a crash leaves the old file or the new one, never a mix."""
import os
import stat


def write_atomically(path, write, suffix=""):
    """Call ``write(f)`` on a temporary binary file beside `path`, flush and fsync it, rename
    it over `path` (atomic on POSIX) and fsync the folder so the rename itself is durable.

    The result is what ``open(path, "wb")`` would leave, except that it appears at once:

    * a symbolic link is written through: the file it points to is replaced (the temporary
      file is made in that file's folder, so the rename stays within one file system) and
      the link stays a link;
    * an existing file keeps its permission bits; a new one gets ``0o666`` less the
      process's umask (and the folder's default ACL), as the kernel applies them to any
      file created with mode ``0o666``, so a file shared with other accounts stays shared.

    Raises FileNotFoundError, naming the folder, when the folder does not exist; on any
    error the temporary file is removed and `path` is left as it was.
    """
    path = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the folder {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    try:
        keep_mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        keep_mode = None
    fd, tmp = _create_beside(directory, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if keep_mode is not None:
                os.chmod(tmp, keep_mode)    # chmod, unlike creation, ignores the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_directory(directory)


def _create_beside(directory, suffix):
    """A new, empty file in `directory`: (descriptor, path).  Unlike tempfile.mkstemp
    (always 0o600) it is created with mode 0o666, which the kernel reduces by the umask:
    reading the umask from Python (os.umask sets it to read it) is not safe while other
    threads create files."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = os.path.join(directory, f".tmp-{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:         # 48 random bits taken: draw again
            continue
    raise FileExistsError(f"cannot create a temporary file in {directory}")


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
