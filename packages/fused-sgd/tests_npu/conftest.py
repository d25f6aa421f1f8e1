"""The NPU hardware suite: FusedSGD and NpuFusedSGD on a real Ascend NPU, against torch.optim.SGD.

Run it on a machine with an Ascend NPU, CANN and torch_npu: ``python -m nox -s npu`` (see
docs/npu.md). Without them the session FAILS, with a message saying what is missing,
instead of skipping: a run that skipped everything must never read as a pass. The default
nox sessions never collect this folder (they run ``packages/fused-sgd/tests``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

# npu_suite.py, next to the tests, holds their shared helpers; it is imported by name.
sys.path.insert(0, str(Path(__file__).parent))


@functools.cache
def _why_no_npu() -> str | None:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device and torch.npu)
    except Exception as error:  # not installed, or installed without CANN's libraries
        return f"torch_npu cannot be imported ({type(error).__name__}: {error})"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return (
            "torch.npu.is_available() is False: no Ascend NPU is visible (check the driver with npu-smi info, "
            "source CANN's set_env.sh, and ASCEND_RT_VISIBLE_DEVICES)"
        )
    return None


def _require_npu() -> None:
    why = _why_no_npu()
    if why is not None:
        pytest.exit(
            f"The NPU hardware suite cannot run here: {why}. It runs only on an Ascend NPU with CANN and "
            "torch_npu installed (python -m nox -s npu, see docs/npu.md); it fails instead of skipping so that "
            "no one counts skipped tests as passing.",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    _require_npu()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    _require_npu()  # when this folder is collected as part of a wider run, sessionstart came too early


@pytest.fixture(scope="session")
def torch_npu():
    import torch_npu

    return torch_npu


@pytest.fixture(scope="session")
def device(torch_npu) -> torch.device:
    return torch.device("npu", torch.npu.current_device())


@pytest.fixture
def private_formats(torch_npu):
    """Let npu_format_cast produce NPU-private formats (torch_npu may forbid them by default on some SoCs)."""
    config = getattr(torch.npu, "config", None)
    previous = getattr(config, "allow_internal_format", None)
    if previous is not None:
        config.allow_internal_format = True
    yield torch_npu
    if previous is not None:
        config.allow_internal_format = previous


def _bf16_supported() -> bool:
    check = getattr(torch.npu, "is_bf16_supported", None)
    return bool(check()) if check is not None else True


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16], ids=str)
def dtype(request: pytest.FixtureRequest, torch_npu) -> torch.dtype:
    if request.param is torch.bfloat16 and not _bf16_supported():
        pytest.skip("this NPU has no bfloat16 (torch.npu.is_bf16_supported() is False)")
    return request.param
