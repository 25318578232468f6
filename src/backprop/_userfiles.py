"""Opening a file a user names, for reading: regular files only.

Anything else costs what it did not bring: a device such as ``/dev/zero`` never ends (a
reader grows without bound), opening a FIFO waits for a writer forever, a terminal waits
for typing.  Every reader of user files in backprop opens them here.
"""
import io
import os
import stat

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _refuse_unless_regular(mode, path, name):
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in _KINDS if test(mode)), "something else")
        raise ValueError(f"{name}={path!r} is {kind}, not a regular file: backprop reads "
                         "only regular files")


def open_regular(path, name="path", encoding=None):
    """`path` opened for reading (binary, or text in `encoding`), if it is a regular file
    (a symbolic link to one is fine); else a ValueError naming `name` and the path.

    The type is checked before opening (so a device is never opened) and again on the
    opened descriptor (so a file swapped in between cannot slip through).  The open itself
    is non-blocking, so that a FIFO put there in between cannot make it wait; a regular
    file's reads never block anyway.  FileNotFoundError and PermissionError pass through.
    """
    path = os.fspath(path)
    _refuse_unless_regular(os.stat(path).st_mode, path, name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        _refuse_unless_regular(os.fstat(fd).st_mode, path, name)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    if encoding is None:
        return f
    return io.TextIOWrapper(f, encoding=encoding)
