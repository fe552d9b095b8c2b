"""The networks: a small CNN (default) and an MLP, for any ``(C, H, W)`` input."""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("cnn", "mlp")


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks with max-pooling, then a 64-unit head."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 32 * (h // 4) * (w // 4)
        self.head = nn.Sequential(
            nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        out: torch.Tensor = self.head(self.features(x))
        return out


class MLP(nn.Module):
    """Two hidden layers of 200 units."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        out: torch.Tensor = self.net(x)
        return out


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> nn.Module:
    """Build a freshly initialised model; the same seed gives the same weights.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    builders = {"cnn": SmallCNN, "mlp": MLP}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return builders[name](input_shape, num_classes)
