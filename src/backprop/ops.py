"""Low-level operations of the compiled core, for use outside a Network."""
from backprop._core import matmul

__all__ = ["matmul"]
