"""The data of ``fused-optim train``: the UCI handwritten digits, split and batched reproducibly.

``load_digits`` reads ``data/digits.csv.gz``, shipped inside this package (1,797 8x8
images, 16 grey levels, 10 classes, ~180 per class; scikit-learn's copy of the UCI
set, byte for byte, see ``data/README.md``), so training needs no network and no
scikit-learn. Pixels are scaled to [0, 1]; a seeded permutation holds out a fifth
for testing; each epoch visits the training set in its own seeded order.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

__all__ = ["NUM_CLASSES", "Digits", "batches_per_epoch", "epoch_batches", "load_digits"]

NUM_CLASSES = 10
MAX_PIXEL = 16.0
"""load_digits counts 0..16 set pixels per 4x4 block of the original 32x32 bitmap."""
DATA_FILE = "digits.csv.gz"
"""In ``fused_optim/data``: one image a line, 64 pixel counts then the label, comma-separated."""


@dataclass(frozen=True)
class Digits:
    """Float32 inputs in [0, 1] of shape (n, 64) and int64 labels, already split."""

    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor

    @property
    def features(self) -> int:
        return self.train_inputs.shape[1]


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """The digits, split by a permutation drawn from ``seed`` (the same split for every run with that seed)."""
    rows = read_digits()
    table = torch.tensor(rows, dtype=torch.int64)
    inputs = table[:, :-1].to(torch.float32) / MAX_PIXEL
    targets = table[:, -1].contiguous()
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(targets) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(inputs[train], targets[train], inputs[test], targets[test])


def read_digits() -> list[list[int]]:
    """The rows of the shipped digits file: 64 pixel counts (0..16) and the label (0..9) each."""
    with resources.files("fused_optim").joinpath("data", DATA_FILE).open("rb") as raw, gzip.open(raw, "rt") as text:
        return [[int(value) for value in line.split(",")] for line in text if line.strip()]


def batches_per_epoch(data: Digits, batch_size: int) -> int:
    """Steps per epoch of :func:`epoch_batches`."""
    return -(-len(data.train_targets) // batch_size)


def epoch_batches(data: Digits, *, epochs: int, batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """``epochs`` passes over the training set in minibatches (the last one of an epoch may be smaller).

    The orders are drawn from a generator of their own, so the sequence of
    batches depends on ``seed`` only, not on anything else drawn from torch's RNGs.
    """
    n = len(data.train_targets)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            yield data.train_inputs[index], data.train_targets[index]
