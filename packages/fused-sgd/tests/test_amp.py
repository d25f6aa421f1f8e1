"""FusedSGD under torch.amp.GradScaler("cpu"), against torch.optim.SGD(foreach=False).

An overflow step must be skipped with parameters AND momentum buffers untouched
(bitwise); every other step must match torch run with the same scaler settings.
Overflows come from a loss scale too large for fp16 autocast (2**60 on the first
step) or from an inf/nan written into one gradient mid-run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_sgd import FusedSGD
from fused_testing.parity import make_batches, make_model
from fused_testing.reference import relative_error

RTOL = 1e-5
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
STEPS = 8


def torch_sgd(params: Any, **hp: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, foreach=False, **hp)


def _poison(model: nn.Module, how: str) -> None:
    """Make one gradient non-finite, in place or by replacing the gradient tensor."""
    p = list(model.parameters())[2]
    if how == "in-place":
        p.grad.view(-1)[5] = float("inf")
    else:
        grad = p.grad.clone()
        grad.view(-1)[5] = float("nan")
        p.grad = grad


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in model.parameters()]
    return params + [b.clone() for b in buffers if b is not None]


def _amp_run(
    cls: Callable[..., torch.optim.Optimizer],
    kind: str,
    *,
    init_scale: float,
    poison_at: dict[int, str],
    autocast: bool = False,
    backoff_factor: float = 0.5,
    set_to_none: bool = False,
    clip: float | None = None,
) -> dict[str, Any]:
    model = make_model(kind)
    optimizer = cls(model.parameters(), **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff_factor, growth_interval=3)
    skipped, scales = [], []
    for step, (inputs, targets) in enumerate(make_batches(kind, STEPS, seed=13)):
        optimizer.zero_grad(set_to_none=set_to_none)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            outputs = model(inputs)
        scaler.scale(F.cross_entropy(outputs.float(), targets)).backward()
        if step in poison_at:
            _poison(model, poison_at[step])
        before = _state(model, optimizer)
        if clip is not None:
            scaler.unscale_(optimizer)
            if isinstance(optimizer, FusedSGD):
                optimizer.clip_grad_norm_fused_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scale)
        if scaler.get_scale() < scale:  # the step overflowed and was skipped
            skipped.append(step)
            after = _state(model, optimizer)
            assert len(after) == len(before)
            for i, (a, b) in enumerate(zip(after, before)):
                assert torch.equal(a, b), f"step {step}: tensor {i} changed on a skipped step"
    return dict(model=model, optimizer=optimizer, skipped=skipped, scales=scales)


CASES = {
    # fp16 autocast: at scale 2**60 the fp16 activation gradients overflow
    "first-step-overflow": dict(init_scale=2.0**60, backoff_factor=2.0**-50, autocast=True, poison_at={}),
    "inf-in-place-mid-run": dict(init_scale=2.0**16, poison_at={3: "in-place", 6: "in-place"}),
    "nan-replaced-grad-mid-run": dict(init_scale=2.0**16, poison_at={4: "replaced"}),
}


@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_overflow_steps_are_skipped_and_the_rest_match_torch(case: str, set_to_none: bool) -> None:
    ours = _amp_run(FusedSGD, "mlp", set_to_none=set_to_none, **CASES[case])
    theirs = _amp_run(torch_sgd, "mlp", set_to_none=set_to_none, **CASES[case])
    expected_skips = [0] if case.startswith("first") else sorted(CASES[case]["poison_at"])
    assert ours["skipped"] == theirs["skipped"] == expected_skips
    assert ours["scales"] == theirs["scales"]
    if case.startswith("first"):
        assert ours["scales"][0] == 2.0**60 and ours["scales"][1] == 2.0**10
    for (name, p), q in zip(ours["model"].named_parameters(), theirs["model"].parameters()):
        assert relative_error(p, q) <= RTOL, name
    for p, q in zip(ours["model"].parameters(), theirs["model"].parameters()):
        mine, reference = ours["optimizer"].state[p]["momentum_buffer"], theirs["optimizer"].state[q]["momentum_buffer"]
        assert relative_error(mine, reference) <= RTOL


def test_first_step_overflow_leaves_no_state() -> None:
    """As torch: a skipped first step creates no momentum buffers."""
    model = make_model("convnet")
    optimizer = FusedSGD(model.parameters(), **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    inputs, targets = make_batches("convnet", 1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        outputs = model(inputs)
    scaler.scale(F.cross_entropy(outputs.float(), targets)).backward()
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(optimizer)
    scaler.update()
    assert len(optimizer.state) == 0 and len(optimizer.state_dict()["state"]) == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_unscale_clip_step_matches_torch(kind: str) -> None:
    """The usual AMP recipe with clipping: unscale_, clip (fused vs torch's), step."""
    case = dict(init_scale=2.0**60, backoff_factor=2.0**-50, autocast=True, poison_at={4: "in-place"})
    ours = _amp_run(FusedSGD, kind, clip=0.5, **case)
    theirs = _amp_run(torch_sgd, kind, clip=0.5, **case)
    assert ours["skipped"] == theirs["skipped"] == [0, 4]
    for (name, p), q in zip(ours["model"].named_parameters(), theirs["model"].parameters()):
        assert relative_error(p, q) <= RTOL, name
