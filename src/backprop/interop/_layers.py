"""What the converters need to know about backprop's layer types, kept in one place.

The PyTorch and ONNX converters both walk ``net.layers`` and switch on each layer's kind;
the layer types beyond ``Dense`` are looked up by name, so one converter serves every
version of backprop and says clearly when a type it needs does not exist.
"""
import backprop

# (class name in backprop, kind): every layer type the converters handle.
LAYER_KINDS = (("Dense", "dense"), ("Activation", "activation"), ("BatchNorm", "batchnorm"),
               ("LayerNorm", "layernorm"), ("Dropout", "dropout"), ("Residual", "residual"))


def kind_of(layer):
    """The converter kind of a backprop layer ("dense", "activation", ...), or None."""
    for class_name, kind in LAYER_KINDS:
        cls = getattr(backprop, class_name, None)
        if cls is not None and isinstance(layer, cls):
            return kind
    return None


def layer_class(class_name, needed_for):
    """backprop's layer class `class_name`, or a clear error naming what needed it."""
    cls = getattr(backprop, class_name, None)
    if cls is None:
        raise ValueError(f"{needed_for} needs backprop.{class_name}, which this version of "
                         "backprop does not have")
    return cls


def network_training(net):
    """The network's mode (True: training); networks without modes behave the same in both."""
    return bool(getattr(net, "training", True))


def check_network(net, caller):
    from backprop.network import Network
    if not isinstance(net, Network):
        raise TypeError(f"{caller}: net must be a backprop.Network, got {type(net).__name__}")
