"""The float64 oracles of fused_testing.oracle, and the conformance suite with a hand-written update."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import Tensor

from fused_testing.conformance import LIGHT_PARAMS, OptimizerConformance
from fused_testing.oracle import Float64Oracle, UpdateOracle, oracle_step
from fused_testing.reference import ReferenceSGD

HP = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)
STEPS = 4


def sgd_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> Tensor:
    """torch.optim.SGD's update, per parameter, from its documentation."""
    grad = -grad if maximize else grad
    grad = grad + weight_decay * param
    if momentum:
        buf = state.get("momentum_buffer")
        buf = grad.clone() if buf is None else momentum * buf + (1 - dampening) * grad
        state["momentum_buffer"] = buf
        grad = grad + momentum * buf if nesterov else buf
    return param - lr * grad


def _data(seed: int = 0) -> tuple[list[Tensor], list[list[Tensor | None]]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 3, generator=generator).half(), torch.randn((), generator=generator), torch.randn(7)]
    grads = [
        [
            None if (step == 0 and index == 2) else torch.randn(p.shape, generator=generator).to(p.dtype)
            for index, p in enumerate(params)
        ]
        for step in range(STEPS)
    ]
    return params, grads


def test_update_oracle_matches_torch_in_float64_and_the_math_reference() -> None:
    params, grads = _data()
    by_update = UpdateOracle(sgd_update, params, **HP)
    by_torch = Float64Oracle(functools.partial(torch.optim.SGD, foreach=False), params, **HP)
    by_math = ReferenceSGD(params, **HP)
    for step_grads in grads:
        by_update.step(step_grads)
        by_torch.step(step_grads)
        by_math.step(step_grads)
    for index, (mine, theirs, math) in enumerate(zip(by_update.params, by_torch.params, by_math.params)):
        assert mine.dtype == theirs.dtype == torch.float64
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-13, atol=1e-13, msg=f"param {index}")
        torch.testing.assert_close(mine, math, rtol=1e-13, atol=1e-13, msg=f"param {index}")
        torch.testing.assert_close(
            by_update.state(index)["momentum_buffer"], by_torch.state(index)["momentum_buffer"], rtol=1e-13, atol=1e-13
        )


def test_oracle_step_skips_parameters_without_gradients_and_copies_its_inputs() -> None:
    params, grads = _data()
    originals = [p.clone() for p in params]
    states: list[dict[str, Any]] = [{} for _ in params]
    updated = oracle_step(sgd_update, params, grads[0], states, **HP)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))  # inputs untouched
    assert torch.equal(updated[2], params[2].double()) and states[2] == {}
    assert "momentum_buffer" in states[0] and updated[0].dtype == torch.float64
    assert not torch.equal(updated[0], params[0].double())


def test_oracle_step_reports_misuse() -> None:
    params, grads = _data()
    with pytest.raises(ValueError, match="one each per parameter"):
        oracle_step(sgd_update, params, grads[0][:1], [{} for _ in params], **HP)
    with pytest.raises(TypeError, match="update_fn returned"):
        oracle_step(lambda p, g, s, **hp: p.sum(), params, grads[1], [{} for _ in params], **HP)


class _TorchAgainstItself(OptimizerConformance):
    optimizer_cls = functools.partial(torch.optim.SGD, foreach=False)
    reference_cls = functools.partial(torch.optim.SGD, foreach=False)
    configs = {"momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)}
    state_keys = ("momentum_buffer",)
    param_specs = LIGHT_PARAMS
    oracle_update = sgd_update


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_suite_with_a_hand_written_oracle(dtype: torch.dtype) -> None:
    """``oracle_update`` is test_low_precision's oracle when set: torch.optim.SGD passes against it."""
    calls: list[int] = []

    def counted(param: Tensor, grad: Tensor, state: dict[str, Any], **hyperparameters: Any) -> Tensor:
        calls.append(param.numel())
        return sgd_update(param, grad, state, **hyperparameters)

    class Suite(_TorchAgainstItself):
        oracle_update = counted

    suite = Suite()
    suite.test_low_precision(suite.named_configs()[0][1], dtype)
    assert len(calls) > suite.steps and sum(calls) > 2000
