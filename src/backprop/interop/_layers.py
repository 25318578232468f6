"""What the PyTorch and ONNX converters share: the check of their argument."""
from backprop.network import Network


def check_network(net, caller):
    if not isinstance(net, Network):
        raise TypeError(f"{caller}: net must be a backprop.Network, got {type(net).__name__}")
