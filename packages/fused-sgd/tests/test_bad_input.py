"""Bad parameters get a clear error that names them, and nothing is mutated."""

from __future__ import annotations

import pytest
import torch

from fused_core import InvalidParameterError
from fused_core.backends import get_backend
from fused_sgd import FusedSGD


def _param(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape))


def test_empty_parameter_list() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        FusedSGD([], lr=0.1)


def test_non_tensor_items() -> None:
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        FusedSGD([_param(64), 3.0], lr=0.1)


def test_non_leaf_tensor() -> None:
    leaf = _param(64)
    with pytest.raises(ValueError, match="non-leaf"):
        FusedSGD([leaf * 2], lr=0.1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_real_floating_dtypes(dtype: torch.dtype) -> None:
    bad = torch.zeros(64, dtype=dtype)
    with pytest.raises(InvalidParameterError, match=rf"param group 0, parameter 1: dtype {dtype}"):
        FusedSGD([_param(64), bad], lr=0.1)


def test_same_tensor_twice_in_a_group() -> None:
    p = _param(64, 64)
    # torch.optim.Optimizer.add_param_group warns about the duplicate before FusedSGD rejects it
    with (
        pytest.warns(UserWarning, match="duplicate parameters"),
        pytest.raises(InvalidParameterError, match="parameter 2: the same tensor as parameter 0"),
    ):
        FusedSGD([p, _param(8), p], lr=0.1)


def test_same_tensor_in_two_groups_leaves_optimizer_unchanged() -> None:
    p = _param(64, 64)
    opt = FusedSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [_param(8), p]})
    assert len(opt.param_groups) == 1


def test_meta_device() -> None:
    meta = torch.nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(InvalidParameterError, match="param group 0, parameter 0: is on the meta device"):
        FusedSGD([meta], lr=0.1)


def test_device_without_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidParameterError, match="device type 'xpu' has no fused-optim backend"):
        get_backend(torch.device("xpu"))
    # the optimizer asks the same question of every parameter: pretend CPU had no backend
    import fused_core.backends as backends

    monkeypatch.delitem(backends._loaded, "cpu")
    with pytest.raises(InvalidParameterError, match="param group 0, parameter 0: device type 'cpu' has no"):
        FusedSGD([_param(64)], lr=0.1)


def test_bad_add_param_group_leaves_optimizer_unchanged() -> None:
    opt = FusedSGD([_param(64)], lr=0.1)
    with pytest.raises(InvalidParameterError, match="param group 1, parameter 0: dtype torch.int64"):
        opt.add_param_group({"params": [torch.zeros(8, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1
