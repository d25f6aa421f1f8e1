"""fused-adam's launchers against each other: what is served where, and the CUDA launcher's math."""

from __future__ import annotations

import pytest
import torch

from fused_adam import FusedAdamW, kernels
from fused_core import registry

CPU = torch.device("cpu")


def test_the_cpu_is_served_by_the_c_kernel_and_never_by_torchs_fused_op() -> None:
    FusedAdamW([torch.nn.Parameter(torch.zeros(1))])  # registers the plugin
    assert not kernels.native_fused_agrees(CPU, torch.float32)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert registry.kernels.resolve("adam", CPU, dtype) is kernels.adam_c_flat
        assert registry.kernels.resolve("adam[segments]", CPU, dtype) is kernels.adam_c_segments


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_torchs_fused_op_agrees_with_the_composite(dtype) -> None:
    """The launcher registered for CUDA (torch._fused_adam_/_fused_adamw_ over a run), checked with
    torch's CPU build of the same op: within 4 units in the last place of the composite, every probe
    case (Adam and AdamW, amsgrad, maximize); on CUDA the registry checks the same before serving."""
    assert kernels._agrees(kernels.adam_native_fused, CPU, dtype, exact=False)
