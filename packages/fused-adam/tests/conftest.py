"""fp32 under torch's square root by default in these tests, the IEEE one where a test asks.

By default FusedAdam/FusedAdamW take the correctly rounded square root in fp32, where torch's CPU
for-loop takes MKL's (1 ulp off on some values): the two then agree to rounding, not bit for bit.
Most tests here check logic (state, checkpoints, schedulers, zero_grad, per-parameter steps) and
check it bit for bit against torch, so they run with ``FUSED_OPTIM_TORCH_SQRT`` set, which makes
fp32 take torch's square root. Tests that use the fixture ``default_sqrt`` (the conformance classes
``...DefaultSqrt``, the kernel's own tests of the default) run as a user's code does, without it.
"""

from __future__ import annotations

import pytest

from fused_core.kernels import TORCH_SQRT_ENV


@pytest.fixture
def default_sqrt() -> None:
    """Marks a test to run with the default (correctly rounded) fp32 square root."""


@pytest.fixture(autouse=True)
def _torch_sqrt_unless_default(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "default_sqrt" in request.fixturenames:
        monkeypatch.delenv(TORCH_SQRT_ENV, raising=False)
    else:
        monkeypatch.setenv(TORCH_SQRT_ENV, "1")
