"""The float64 reference against hand-computed values and torch.optim.SGD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fused_testing.reference import ReferenceSGD, relative_error, sgd_reference_step

STEPS = 5


def _grid() -> list[dict[str, float | bool]]:
    grid = []
    for momentum, dampening, weight_decay, nesterov, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (0.0, 1e-2), (False, True), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # rejected by torch.optim.SGD
        grid.append(
            dict(
                lr=0.1,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
            )
        )
    return grid


def test_hand_computed_momentum_nesterov_weight_decay() -> None:
    p, g = torch.tensor([1.0]), torch.tensor([2.0])
    hp = dict(lr=0.5, momentum=0.5, weight_decay=0.25, nesterov=True)
    # Step 1: g = 2 + 0.25*1 = 2.25; b = 2.25; g = 2.25 + 0.5*2.25 = 3.375; p = 1 - 0.5*3.375
    p1, b1 = sgd_reference_step(p, g, None, **hp)
    assert p1.item() == pytest.approx(-0.6875, abs=1e-15)
    assert b1 is not None and b1.item() == pytest.approx(2.25, abs=1e-15)
    # Step 2: g = 2 + 0.25*(-0.6875) = 1.828125; b = 0.5*2.25 + 1.828125 = 2.953125
    #         g = 1.828125 + 0.5*2.953125 = 3.3046875; p = -0.6875 - 0.5*3.3046875
    p2, b2 = sgd_reference_step(p1, g, b1, **hp)
    assert b2 is not None and b2.item() == pytest.approx(2.953125, abs=1e-15)
    assert p2.item() == pytest.approx(-2.33984375, abs=1e-15)


def test_hand_computed_dampening_maximize() -> None:
    p, g = torch.tensor([0.0]), torch.tensor([1.0])
    hp = dict(lr=1.0, momentum=0.5, dampening=0.5, maximize=True)
    p1, b1 = sgd_reference_step(p, g, None, **hp)  # first step: b = g, undamped
    assert (p1.item(), b1.item()) == (1.0, -1.0)
    p2, b2 = sgd_reference_step(p1, g, b1, **hp)  # b = 0.5*(-1) + 0.5*(-1)
    assert (p2.item(), b2.item()) == (2.0, -1.0)


def test_no_momentum_returns_no_buffer_and_leaves_inputs_alone() -> None:
    p = torch.ones(3, dtype=torch.float16)
    g = torch.full((3,), 0.5, dtype=torch.float16)
    new_p, buf = sgd_reference_step(p, g, None, lr=0.1)
    assert buf is None
    assert new_p.dtype == torch.float64
    assert torch.equal(p, torch.ones(3, dtype=torch.float16))
    assert torch.allclose(new_p, torch.full((3,), 0.95, dtype=torch.float64))


@pytest.mark.parametrize("numel", [4096, 4097])
@pytest.mark.parametrize("hp", _grid(), ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items()))
def test_matches_torch_sgd_float64(numel: int, hp: dict[str, float | bool]) -> None:
    gen = torch.Generator().manual_seed(numel)
    init = torch.randn(numel, generator=gen, dtype=torch.float64)
    grads = [torch.randn(numel, generator=gen, dtype=torch.float64) for _ in range(STEPS)]

    param = torch.nn.Parameter(init.clone())
    opt = torch.optim.SGD([param], foreach=False, **hp)
    ref_param, ref_buf = init, None
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
        ref_param, ref_buf = sgd_reference_step(ref_param, grad, ref_buf, **hp)

    assert relative_error(param, ref_param) < 1e-12
    torch_buf = opt.state[param].get("momentum_buffer")
    if hp["momentum"] == 0:
        assert ref_buf is None
    else:
        assert relative_error(torch_buf, ref_buf) < 1e-12
    assert relative_error(param, init) > 1e-3  # the steps did something


def test_reference_sgd_skips_none_grads_like_torch() -> None:
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(7, 5), (3,), (2, 2, 2)]]
    torch_params = [torch.nn.Parameter(t.clone()) for t in inits]
    opt = torch.optim.SGD(torch_params, foreach=False, **hp)
    ref = ReferenceSGD(inits, **hp)

    # param 1 gets no grad on steps 0 and 2; param 2 only from step 2 on
    present = [(True, False, False), (True, True, False), (True, False, True), (True, True, True)]
    for mask in present:
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) if on else None for t, on in zip(inits, mask)]
        for p, g in zip(torch_params, grads):
            p.grad = None if g is None else g.clone()
        before = [p.clone() for p in ref.params]
        buffers_before = [None if b is None else b.clone() for b in ref.momentum_buffers]
        opt.step()
        ref.step(grads)
        for i, g in enumerate(grads):
            if g is None:
                assert torch.equal(ref.params[i], before[i])
                if buffers_before[i] is None:
                    assert ref.momentum_buffers[i] is None
                else:
                    assert torch.equal(ref.momentum_buffers[i], buffers_before[i])

    for p, r in zip(torch_params, ref.params):
        assert relative_error(p, r) < 1e-12
    for p, b in zip(torch_params, ref.momentum_buffers):
        assert relative_error(opt.state[p]["momentum_buffer"], b) < 1e-12


def test_reference_sgd_holds_float64_copies_and_reads_hyperparams_each_step() -> None:
    source = torch.ones(4, dtype=torch.bfloat16)
    ref = ReferenceSGD([source], lr=1.0)
    assert ref.params[0].dtype == torch.float64
    ref.hyperparams["lr"] = 0.25  # as a scheduler would
    ref.step([torch.ones(4, dtype=torch.bfloat16)])
    assert torch.equal(ref.params[0], torch.full((4,), 0.75, dtype=torch.float64))
    assert torch.equal(source, torch.ones(4, dtype=torch.bfloat16))


def test_reference_sgd_rejects_wrong_number_of_grads() -> None:
    with pytest.raises(ValueError, match="expected 2 grads"):
        ReferenceSGD([torch.ones(1), torch.ones(1)], lr=0.1).step([torch.ones(1)])


@pytest.mark.parametrize("hp", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1)])
def test_nesterov_needs_undamped_momentum(hp: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Nesterov"):
        sgd_reference_step(torch.ones(1), torch.ones(1), None, lr=0.1, nesterov=True, **hp)
    with pytest.raises(ValueError, match="Nesterov"):
        ReferenceSGD([torch.ones(1)], lr=0.1, nesterov=True, **hp)


def test_tensor_lr() -> None:
    p, _ = sgd_reference_step(torch.ones(2), torch.ones(2), None, lr=torch.tensor(0.5))
    assert torch.equal(p, torch.full((2,), 0.5, dtype=torch.float64))


def test_relative_error() -> None:
    e = torch.tensor([1.0, -4.0, 2.0])
    assert relative_error(e, e) == 0.0
    assert relative_error(torch.tensor([1.0, -4.0, 3.0]), e) == pytest.approx(0.25)
    assert relative_error(torch.zeros(0), torch.zeros(0)) == 0.0
    # all-zero expected: normalised by `tiny`, so any difference is huge
    assert relative_error(torch.tensor([1e-300], dtype=torch.float64), torch.zeros(1)) > 1e6
    assert relative_error(torch.tensor([math.nan, 0.0, 0.0]), e) == math.inf
    # mixed dtypes compare in float64
    half = e.to(torch.float16)
    assert relative_error(half, e.to(torch.float64)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        relative_error(torch.zeros(3), torch.zeros(4))
