"""Use backprop networks from other frameworks: PyTorch and ONNX.

* ``to_torch(net)``: a ``torch.nn.Sequential`` with copies of the network's weights.
* ``from_torch(module, loss=None, optimizer=None, dtype=None)``: a ``Network`` from a
  ``torch.nn.Sequential``.
* ``TorchRNN``, ``TorchLSTM``, ``TorchGRU``, ``TorchLastStep``: the torch modules a
  Sequential holds for the recurrent layers (batch first, the output sequence only) and
  LastStep (``x[:, -1]``).
* ``TorchModule(net)``: a ``torch.nn.Module`` that runs the network (forward and backward
  in backprop's core) inside a torch model, its weights shared with ``net.params``.
* ``to_onnx(net, path, opset=17)``: a standard ONNX file for onnxruntime and other servers.

PyTorch and onnx are optional: each is imported only when a function that needs it is first
used (``pip install torch``; ``pip install onnx``).
"""

_TORCH_NAMES = ("to_torch", "from_torch", "TorchModule", "TorchResidual", "TorchRNN",
                "TorchLSTM", "TorchGRU", "TorchLastStep")
_ONNX_NAMES = ("to_onnx",)

__all__ = list(_TORCH_NAMES + _ONNX_NAMES)


def __getattr__(name):
    # Imported on first use, so ``import backprop`` never pays for (or needs) torch or onnx.
    if name in _TORCH_NAMES:
        from backprop.interop import pytorch
        return getattr(pytorch, name)
    if name in _ONNX_NAMES:
        from backprop.interop import onnx_export
        return getattr(onnx_export, name)
    raise AttributeError(f"module 'backprop.interop' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
