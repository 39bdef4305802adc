"""A small Conv+BatchNorm+ReLU CNN for scikit-learn's 8x8 digits, and its training loop.

Three ``Conv3x3 -> BatchNorm -> ReLU`` blocks (16, 32, 64 channels, max-pooling after the
second and third) and a ``Linear(256, 10)`` head: 25 k parameters. Trained from a fixed seed
with Adam and a cosine learning-rate schedule for a few seconds on CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Input [N,1,8,8] (pixels in [0,1]), output logits [N,10]."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2)
        )
        self.classifier = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def train_digits_cnn(
    x: np.ndarray, y: np.ndarray, epochs: int = 15, batch_size: int = 32, lr: float = 3e-3, seed: int = 0
) -> DigitsCNN:
    """Train from ``seed`` on ``x`` [N,1,8,8] float32 and labels ``y``; return the net in eval mode."""
    torch.manual_seed(seed)
    net = DigitsCNN()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * -(-len(ys) // batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(ys), generator=generator)
        for start in range(0, len(ys), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(net(xs[idx]), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()
