"""fused_testing.roots: fp32 square roots replaced within the block, torch's everywhere else."""

from __future__ import annotations

import torch

from fused_testing.roots import fp32_sqrt_replaced


def test_fp32_roots_are_replaced_within_the_block_only() -> None:
    x32 = torch.rand(1000) + 0.5
    x64 = x32.double()
    original = (torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_)
    with fp32_sqrt_replaced(lambda x: torch.full_like(x, 7.0)):
        assert torch.equal(torch.sqrt(x32), torch.full_like(x32, 7.0))
        assert torch.equal(x32.sqrt(), torch.full_like(x32, 7.0))
        assert torch.equal(x32.clone().sqrt_(), torch.full_like(x32, 7.0))
        assert torch.equal(x64.sqrt(), torch.ops.aten.sqrt(x64))  # other dtypes keep torch's
    assert (torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_) == original
    assert torch.equal(x32.sqrt(), torch.ops.aten.sqrt(x32))
    with fp32_sqrt_replaced(None):
        assert torch.sqrt is original[0]
