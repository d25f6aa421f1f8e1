"""Running a reference optimizer with another square root: a fused optimizer whose fp16/bf16 updates
compute in fp32 with a root other than torch's (the correctly rounded one, where torch's CPU root is
MKL's) is checked bit for bit against torch's optimizer in fp32 with that root put in place."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def fp32_sqrt_replaced(root: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Within the block, ``torch.sqrt``, ``Tensor.sqrt`` and ``Tensor.sqrt_`` of fp32 tensors compute
    ``root`` (other dtypes keep torch's); ``root`` None changes nothing. ``root`` may itself take
    torch's root of another dtype (fp64)."""
    if root is None:
        yield
        return
    function, method, in_place = torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_

    def sqrt(x: torch.Tensor) -> torch.Tensor:
        return root(x) if x.dtype == torch.float32 else function(x)

    def sqrt_method(x: torch.Tensor) -> torch.Tensor:
        return root(x) if x.dtype == torch.float32 else method(x)

    def sqrt_in_place(x: torch.Tensor) -> torch.Tensor:
        return x.copy_(root(x)) if x.dtype == torch.float32 else in_place(x)

    torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_ = sqrt, sqrt_method, sqrt_in_place  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_ = function, method, in_place  # type: ignore[assignment]
