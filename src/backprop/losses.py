"""The built-in losses: one declaration each.

A loss is one compiled kernel (``_losses.pxd``: the loss and its gradient in one pass, a
row of the loss table in ``_kernels.pyx``) and one ``Loss`` here, which the Network, the
planner, the Engine, training and checkpoints read.  Each is PyTorch's, with its mean
reduction.
"""
from dataclasses import dataclass

from backprop._core import LOSS_KERNELS


@dataclass(frozen=True)
class Loss:
    name: str              # what users pass: Network(..., loss=name)
    kernel: str            # its row in the compiled loss table
    output: object         # the output activation it needs (its logits are read), or None
    targets: str           # "values", "probabilities" (in [0, 1]) or "distributions" (rows
                           # of probabilities summing to 1)
    labels: bool           # integer class labels of shape (batch,) are also accepted
    torch: str             # the PyTorch loss it equals

    @property
    def from_logits(self):
        """Its gradient is taken with respect to the output's logits (the last record's
        pre-activation), which the planner therefore keeps."""
        return self.output is not None

    @property
    def classifier(self):
        """Outputs are class probabilities: predict gives classes, evaluate accuracy."""
        return self.targets != "values"


LOSSES = {loss.name: loss for loss in (
    Loss("mse", "mse", None, "values", False, "MSELoss"),
    Loss("binary_cross_entropy", "binary_cross_entropy", "sigmoid", "probabilities", False,
         "BCEWithLogitsLoss on the sigmoid's logits"),
    Loss("cross_entropy", "cross_entropy", "softmax", "distributions", True,
         "CrossEntropyLoss on the softmax's logits"),
)}

for _loss in LOSSES.values():        # a declaration without a kernel cannot be used
    if _loss.kernel not in LOSS_KERNELS:
        raise ImportError(f"backprop: loss {_loss.name!r} has no compiled kernel")


def get(name):
    """The declaration of loss `name`; None for None; ValueError for an unknown name."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r:.80}; choose one of {sorted(LOSSES)} or None")
    return LOSSES[name]
