"""fused_core.kernels' numeric helpers against independent references."""

import numpy as np
import torch

from fused_core.kernels import correctly_rounded_sqrt


def test_correctly_rounded_sqrt_is_ieee() -> None:
    """Equal to numpy's square root (IEEE 754, rounded to nearest) on a whole binade pair of fp32
    values and on random ones of every magnitude, where torch's MKL sqrt is not."""
    binades = (torch.arange(1 << 24, dtype=torch.int32) + 0x3F800000).view(torch.float32)  # [1, 4)
    spread = torch.randn(1 << 16, dtype=torch.float64).exp_().mul_(torch.randint(-60, 60, (1 << 16,)).exp2())
    for x in (binades, spread.float()):
        expected = torch.from_numpy(np.sqrt(x.numpy()))
        assert torch.equal(correctly_rounded_sqrt(x).view(torch.int8), expected.view(torch.int8))
