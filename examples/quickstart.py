"""Train a small MLP with FusedSGD and with torch.optim.SGD side by side; print how close they stay."""

from __future__ import annotations

import torch

from fused_sgd import FusedSGD
from fused_testing.parity import assert_parity, train_side_by_side

hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
result = train_side_by_side(
    lambda model: torch.optim.SGD(model.parameters(), foreach=False, **hp),
    lambda model: FusedSGD(model.parameters(), **hp),
    model_kind="deep-mlp",
    steps=30,
)
print(f"loss  torch.optim.SGD: {result.losses_a[0]:.4f} -> {result.losses_a[-1]:.4f}")
print(f"loss  FusedSGD:        {result.losses_b[0]:.4f} -> {result.losses_b[-1]:.4f}")
print(f"largest relative parameter difference after 30 steps: {result.max_relative_error:.2e}")
buckets = result.optimizer_b._layout.buckets
print(f"{sum(len(b.plan.slots) for b in buckets)} parameters live in {len(buckets)} flat buffer(s)")
assert_parity(result, rtol=1e-5)
