"""Checkpoint files: named arrays in one ``.npz``, written atomically, read without
executing anything and without trusting what the file says about itself.

This module only moves arrays between memory and disk; what they mean (a network's
parameters, buffers, optimizer state and its JSON ``header``) is ``record.py``'s business.

Writing: a temporary file in the destination's directory (a symbolic link's target's),
flushed and fsynced, renamed over the destination (atomic on POSIX), then the directory
fsynced: a crash at any point leaves either the old file or the new one, never a mix.  The
file gets the permissions a plain ``open(path, "wb")`` would give (see ``_atomic.py``).

Reading: only a regular file is opened (``/dev/zero`` or a FIFO is refused, see
``_userfiles.py``).  The caller says which members it wants and what shape and dtype each
must have (worked out from the header, not from the members).  Each is checked against the
archive before a byte of it is read: present, stored uncompressed (as ``np.savez``
writes), its ``.npy`` header matching the expected shape and dtype, its size matching, and
lying inside the file.  Nothing else in the archive is read, so neither a header claiming a
huge layer nor an extra member costs memory.
"""
import os
import zipfile

import numpy as np

from backprop._atomic import write_atomically
from backprop._userfiles import open_regular

# The JSON header of a network with a long history is a few hundred KB at most.
MAX_HEADER_BYTES = 16 << 20


def write(path, arrays):
    """Write {name: ndarray} as an .npz at `path`, atomically."""
    write_atomically(path, lambda f: np.savez(f, **arrays), suffix=".npz")


class Archive:
    """An .npz opened for checked reading; use as a context manager."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.file = open_regular(self.path)         # FileNotFoundError passes through
        try:
            self.size = os.fstat(self.file.fileno()).st_size
            self.zip = zipfile.ZipFile(self.file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            self.file.close()
            raise ValueError(f"{self.path}: not a readable checkpoint (truncated or "
                             f"corrupted?): {e}") from None
        except BaseException:
            self.file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()
        self.file.close()

    def has(self, name):
        return f"{name}.npy" in self.zip.NameToInfo

    def array(self, name, shape=None, dtype=None, max_bytes=None):
        """Member `name` as an ndarray, after checking it is what the caller expects:
        `shape` and `dtype` exactly (1-D uint8 of at most `max_bytes` for a header)."""
        info = self.zip.NameToInfo.get(f"{name}.npy")
        if info is None:
            raise ValueError(f"{self.path}: the checkpoint has no {name!r} array")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size \
                or info.header_offset + info.compress_size > self.size:
            raise ValueError(f"{self.path}: array {name!r} is compressed or larger than the file")
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy version {version}")
                stored_shape, fortran, stored_dtype = read_header(f)
                if stored_dtype.hasobject or fortran:
                    raise ValueError("object or Fortran-ordered arrays are not checkpoints")
                if max_bytes is not None:          # the header: any 1-D uint8 up to a size
                    shape, dtype = stored_shape, np.dtype(np.uint8)
                    if len(shape) != 1 or shape[0] > max_bytes:
                        raise ValueError(f"the header has shape {stored_shape}, at most "
                                         f"({max_bytes},) allowed")
                if stored_shape != tuple(shape) or stored_dtype.newbyteorder("=") != dtype:
                    raise ValueError(f"array {name!r} has shape {stored_shape} and dtype "
                                     f"{stored_dtype}, the network needs {tuple(shape)} {dtype}")
                nbytes = int(np.prod(shape, dtype=np.int64)) * stored_dtype.itemsize
                if f.tell() + nbytes != info.file_size:
                    raise ValueError(f"array {name!r} holds {info.file_size - f.tell()} bytes "
                                     f"of data, its shape needs {nbytes}")
                out = np.empty(shape, dtype=stored_dtype)
                if nbytes and f.readinto(memoryview(out).cast("B")) != nbytes:
                    raise ValueError(f"array {name!r} is truncated")
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
            raise ValueError(f"{self.path}: array {name!r} cannot be read (truncated or "
                             f"corrupted?): {e}") from None
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None
        return out.astype(dtype, copy=False)
