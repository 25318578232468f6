"""The training configurations every benchmark uses (float32, SGD step)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    name: str
    sizes: tuple          # layer sizes from input to output
    batch: int
    hidden: str = "relu"
    output: str = "softmax"
    loss: str = "cross_entropy"
    lr: float = 0.01

    @property
    def classifier(self):
        return self.loss == "cross_entropy"


CONFIGS = {c.name: c for c in [
    Config("xor", (2, 2, 1), 4, hidden="sigmoid", output="sigmoid", loss="mse", lr=0.5),
    Config("digits", (64, 32, 10), 32),
    Config("mnist-small", (784, 128, 10), 64),
    Config("mnist-mid", (784, 512, 512, 10), 128),
    Config("wide", (1024, 1024, 1024, 1024, 10), 256),
    Config("huge", (4096, 4096, 4096, 10), 256),
]}

# Per-step targets from the speed issue, in microseconds.
TARGET_US = {"xor": 3, "digits": 12, "mnist-small": 220, "mnist-mid": 3300, "wide": 31000,
             "huge": 300000}
