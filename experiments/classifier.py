"""The small CNN of CGN's invariant-classifier experiment, and its training recipe (Adadelta, StepLR).

~67k parameters on 3×32×32 inputs, in the range of CGN's ~68k. The same network on 1-channel inputs is
the digit recogniser that scores whether generated masks show the digit of their shape label.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 42), nn.ReLU(), nn.Linear(42, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class TrainConfig:
    """CGN's recipe: Adadelta lr 1.0, StepLR γ 0.7 per epoch, batch 64; epochs are our CPU budget's."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 1.0
    gamma: float = 0.7

    def to_dict(self) -> dict:
        return asdict(self)


def train_classifier(images: np.ndarray, labels: np.ndarray, config: TrainConfig, seed: int,
                     n_classes: int = 10) -> SmallCNN:
    """Train a fresh SmallCNN; `seed` fixes the initialisation and the batch order."""
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=images.shape[1], n_classes=n_classes)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    x_all, y_all = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.from_numpy(rng.permutation(len(images)))
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = F.cross_entropy(model(x_all[batch]), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def predict(model: nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([
            model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))).argmax(1).numpy()
            for i in range(0, len(images), batch)
        ])


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images) == labels).mean())


def fit_and_score(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], config: TrainConfig,
                  seed: int, n_classes: int = 10) -> dict:
    """Train on `train`, report train and test accuracy (%) and the wall time."""
    started = time.perf_counter()
    model = train_classifier(*train, config, seed, n_classes)
    return {
        "seed": seed,
        "train_accuracy": 100 * accuracy(model, *train),
        "test_accuracy": 100 * accuracy(model, *test),
        "seconds": round(time.perf_counter() - started, 1),
    }
