"""Checkpoints: one ``.npz`` file, written atomically, read without executing anything.

Format (version 1): a NumPy ``.npz`` archive (``np.savez``, no pickled objects) with

* ``header``: UTF-8 JSON as a uint8 array: ``{"format": "backprop-checkpoint",
  "version": 1, "network": <Network.config()>, "optimizer": {"name", "hyperparameters",
  "step"}, "rng": <numpy bit-generator state>, "epoch": int, "history": {...}}``;
* ``params``: the flat parameter buffer, in the network's dtype;
* ``optimizer.<name>``: each optimizer state buffer (same shape as ``params``).

Saving writes a temporary file in the destination's directory, flushes and fsyncs it,
then renames it over the destination (atomic on POSIX) and fsyncs the directory: a
crash at any point leaves either the old checkpoint or the new one, never a mix.
Loading uses ``allow_pickle=False`` and validates everything it reads.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "backprop-checkpoint"
VERSION = 1


def save(net, path):
    path = os.fspath(path)
    opt = net.optimizer.state_dict()
    header = {
        "format": FORMAT, "version": VERSION, "network": net.config(),
        "optimizer": {"name": opt["name"], "hyperparameters": opt["hyperparameters"],
                      "step": opt["step"]},
        "rng": net.rng.bit_generator.state, "epoch": net.epoch,
        "history": net.history.to_dict(),
    }
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
              "params": net.params}
    arrays.update({f"optimizer.{name}": value for name, value in opt["state"].items()})
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path):
    from backprop.layers import Dense
    from backprop.network import Network
    from backprop.optim import OPTIMIZERS
    from backprop.training import History

    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path}: not a readable backprop checkpoint (truncated or "
                         f"corrupted?): {e}") from None
    header = _header(path, arrays)
    try:
        config = header["network"]
        layers = [Dense(**layer) for layer in config["layers"]]
        opt = header["optimizer"]
        if opt["name"] not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {opt['name']!r}")
        optimizer = OPTIMIZERS[opt["name"]](**opt["hyperparameters"])
        net = Network(layers, loss=config["loss"], optimizer=optimizer, dtype=config["dtype"],
                      seed=config["seed"])
        params = arrays["params"]
        if params.shape != net.params.shape or params.dtype != net.params.dtype:
            raise ValueError(f"params has shape {params.shape} and dtype {params.dtype}, the "
                             f"architecture needs {net.params.shape} {net.params.dtype}")
        if not np.isfinite(params).all():
            raise ValueError("params contain NaN or Inf")
        net.params[...] = params
        state = {name[len("optimizer."):]: value for name, value in arrays.items()
                 if name.startswith("optimizer.")}
        optimizer.load_state_dict({"name": opt["name"], "hyperparameters": opt["hyperparameters"],
                                   "step": opt["step"], "state": state})
        net.rng.bit_generator.state = header["rng"]
        net.epoch = int(header["epoch"])
        net.history = History(**header["history"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid backprop checkpoint: {e}") from None
    return net


def _header(path, arrays):
    if "header" not in arrays or "params" not in arrays:
        raise ValueError(f"{path}: not a backprop checkpoint (no header/params)")
    raw = arrays["header"]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{path}: not a backprop checkpoint (malformed header)")
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupted checkpoint header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a backprop checkpoint")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise ValueError(f"{path}: checkpoint format version {header.get('version')} is newer "
                         f"than this backprop reads ({VERSION}); upgrade backprop")
    return header
