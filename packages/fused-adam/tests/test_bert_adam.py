"""FusedBertAdam and NpuFusedBertAdam: fused_testing's conformance suite, the float64 math, the
schedules, torch_npu's checkpoints and signature.

torch has no BertAdam: the reference is :class:`fused_adam.bert_reference.BertAdam` (per tensor,
pytorch-pretrained-BERT's arithmetic with torch_npu's signature); bit for bit in fp32 and fp64;
in fp16 and bf16 no further from a float64 run of the original's formula
(:func:`bert_adam_float64`) than the reference itself in that dtype. The configs cover every
schedule, warmup, clipping on (the default, ``max_grad_norm=1``: every gradient of more than a
few elements is clipped) and off, weight decay on and off, and steps past ``t_total``.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from fused_adam import FusedBertAdam, NpuFusedBertAdam
from fused_adam.bert_reference import SCHEDULES, BertAdam, scheduled_lr
from fused_core import InvalidHyperparameterError
from fused_testing.conformance import OptimizerConformance

STATE_FOLLOWS_DTYPE = (
    "fused optimizers convert their state to the parameters' new dtype when they change dtype "
    "between steps (model.to); a torch.optim.Optimizer keeps each state tensor's dtype (docs/migration.md)"
)
FACTORS = {  # the schedules, from pytorch-pretrained-BERT's definitions
    "warmup_linear": lambda x, w: x / w if x < w else max((x - 1) / (w - 1), 0.0),
    "warmup_constant": lambda x, w: x / w if x < w else 1.0,
    "warmup_cosine": lambda x, w: x / w if x < w else 0.5 * (1 + math.cos(math.pi * x)),
    "warmup_poly": lambda x, w: x / w if x < w else max(1 - x, 0.0) ** 0.5,
}


def bert_adam_float64(
    param, grad, state, *, lr, warmup=-1, t_total=-1, schedule="warmup_linear", b1=0.9, b2=0.999, e=1e-6,
    weight_decay=0.01, max_grad_norm=1.0,
):  # fmt: skip
    """The original's update, for the float64 oracle."""
    t = state.get("t", 0)
    m, v = state.get("m", torch.zeros_like(param)), state.get("v", torch.zeros_like(param))
    if max_grad_norm > 0:
        grad = grad * min(1.0, max_grad_norm / (float(grad.norm()) + 1e-6))
    state["m"] = m = b1 * m + (1 - b1) * grad
    state["v"] = v = b2 * v + (1 - b2) * grad * grad
    state["t"] = t + 1
    rate = float(lr) * (FACTORS[schedule](t / t_total, warmup) if t_total != -1 else 1.0)
    return param - rate * (m / (v.sqrt() + e) + (weight_decay * param if weight_decay > 0 else 0))


BAD = [
    (dict(lr=-1.0), ValueError),
    (dict(warmup=1.0), ValueError),
    (dict(warmup=-0.5), ValueError),
    (dict(schedule="warmup_exp"), ValueError),
    (dict(b1=1.0), ValueError),
    (dict(b2=-0.1), ValueError),
    (dict(e=-1e-6), ValueError),
    (dict(t_total=0), ValueError),
    (dict(weight_decay=-0.1), ValueError),
    (dict(lr=float("nan")), InvalidHyperparameterError),
    (dict(max_grad_norm="1"), InvalidHyperparameterError),
    (dict(betas=(0.9, 0.999)), TypeError),
]


class TestFusedBertAdamConformance(OptimizerConformance):
    optimizer_cls = FusedBertAdam
    reference_cls = BertAdam
    configs = {
        "defaults": dict(lr=1e-2),
        "warmup_linear": dict(lr=1e-2, warmup=0.3, t_total=10, weight_decay=0.1),
        "cosine_noclip": dict(lr=5e-3, warmup=0.2, t_total=8, schedule="warmup_cosine", max_grad_norm=-1.0),
        "poly_past_t_total": dict(lr=1e-2, warmup=0.0, t_total=6, schedule="warmup_poly", b1=0.8, b2=0.99, e=1e-4),
        "constant_wd0_bignorm": dict(
            lr=torch.tensor(1e-2), t_total=4, schedule="warmup_constant", weight_decay=0.0, max_grad_norm=30.0
        ),
    }
    state_keys = ("step", "exp_avg", "exp_avg_sq")
    exact_dtypes = (torch.float32, torch.float64)
    oracle_update = staticmethod(bert_adam_float64)
    second_group = {"lr": 1e-3, "max_grad_norm": -1.0, "weight_decay": 0.0}
    bad_hyperparameters = BAD
    expected_failures = {f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in configs}


class TestNpuFusedBertAdamConformance(OptimizerConformance):
    """torch_npu's signature; ``zero_grad()`` keeps zeroed gradients."""

    optimizer_cls = NpuFusedBertAdam
    reference_cls = BertAdam
    configs = {"warmup_linear": dict(lr=1e-2, warmup=0.2, t_total=12, weight_decay=0.05)}
    state_keys = ("step", "exp_avg", "exp_avg_sq")
    exact_dtypes = (torch.float32, torch.float64)
    oracle_update = staticmethod(bert_adam_float64)
    zero_grad_set_to_none_default = False
    bad_hyperparameters = BAD
    expected_failures = {f"test_dtype_change[{name}]": STATE_FOLLOWS_DTYPE for name in configs}


# ----- beyond the suite ----------------------------------------------------------------
SHAPES = ((40, 30), (1000,), (), (3, 0), (7,))
STEPS = 8
FLOAT64_CONFIGS = {
    "clipped_linear": dict(lr=1e-2, warmup=0.25, t_total=6),  # past t_total from step 7
    "cosine_wd": dict(lr=1e-2, warmup=0.1, t_total=10, schedule="warmup_cosine", weight_decay=0.3, max_grad_norm=5.0),
    "poly": dict(lr=3e-3, t_total=5, schedule="warmup_poly", b1=0.5, b2=0.9, e=1e-3, max_grad_norm=-1),
    "constant": dict(lr=2e-2, warmup=0.5, t_total=8, schedule="warmup_constant", weight_decay=0.0),
    "no_schedule": dict(lr=1e-3, warmup=0.3),
}
MAKERS = {
    "FusedBertAdam": FusedBertAdam,
    "NpuFusedBertAdam": NpuFusedBertAdam,
    "reference": BertAdam,
    "reference-foreach": lambda params, **config: BertAdam(params, foreach=True, **config),
}


@pytest.fixture
def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


def _data(seed: int, dtype: torch.dtype = torch.float64):
    """Parameters of SHAPES and STEPS steps of gradients (of different sizes per parameter, so that
    some are clipped and some not)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES]

    def randn(shape: tuple[int, ...], scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    grads = [[randn(shape, 0.1 * i) for i, shape in enumerate(SHAPES, 1)] for _ in range(STEPS)]
    return params, grads


def _trajectory(make, config: dict, seed: int, dtype: torch.dtype = torch.float64):
    params, grads = _data(seed, dtype)
    leaves = [p.clone().requires_grad_() for p in params]
    optimizer = make(leaves, **config)
    for step in range(STEPS):
        for leaf, grad in zip(leaves, grads[step]):
            leaf.grad = grad.clone()
        optimizer.step()
        yield [leaf.detach().clone() for leaf in leaves], optimizer, leaves


@pytest.mark.parametrize("config", FLOAT64_CONFIGS.values(), ids=FLOAT64_CONFIGS.keys())
@pytest.mark.parametrize("maker", MAKERS.keys())
def test_float64_follows_the_original(maker: str, config: dict, seed: int) -> None:
    """In float64 every step is the original BertAdam's update (:func:`bert_adam_float64`: the
    gradient clipped by its own parameter's norm, no bias correction, decoupled decay, the
    scheduled rate at the parameter's count) of what the optimizer held, to 1e-12."""
    params, grads = _data(seed)
    states = [{} for _ in params]
    want = params
    for step, (got, optimizer, leaves) in enumerate(_trajectory(MAKERS[maker], config, seed)):
        want = [bert_adam_float64(p, g, s, **config) for p, g, s in zip(want, grads[step], states)]
        for i, (mine, theirs, state) in enumerate(zip(got, want, states)):
            error = float((mine - theirs).abs().max()) if mine.numel() else 0.0
            assert error <= 1e-12, f"{maker} step {step + 1} parameter {i}: {error:.3e} from the original, seed {seed}"
            assert float(optimizer.state[leaves[i]]["step"]) == state["t"]
        want = got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_foreach_reference(dtype: torch.dtype, seed: int) -> None:
    """The benchmark's competitor (foreach=True): the per-tensor bits without clipping; with it,
    within a few ulps of the largest value (its norms come from torch._foreach_norm)."""
    unclipped = dict(FLOAT64_CONFIGS["cosine_wd"], max_grad_norm=-1)
    for config, exact in ((unclipped, True), (FLOAT64_CONFIGS["clipped_linear"], False)):
        makers = (MAKERS["reference-foreach"], BertAdam)
        foreach, per_tensor = (_trajectory(make, config, seed, dtype) for make in makers)
        for (mine, *_), (theirs, *_) in zip(foreach, per_tensor):
            for a, b in zip(mine, theirs):
                if exact:
                    assert torch.equal(a, b), f"seed {seed}"
                elif b.numel():
                    error = float((a - b).abs().max() / b.abs().max())
                    assert error <= 8 * torch.finfo(dtype).eps, f"{error:.3e} relative, seed {seed}"


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedules(schedule: str) -> None:
    """Each schedule's factor is pytorch-pretrained-BERT's (:data:`FACTORS`) at the step's
    ``t / t_total``, over warmups -1, 0 and 0.1 and steps before, in and past the warmup and t_total;
    ``warmup_linear`` with ``warmup=-1`` starts at 1/2, ``warmup_poly`` is 0 past ``t_total``."""
    for warmup in (-1, 0.0, 0.1):
        for step in range(0, 25):
            group = dict(lr=0.5, t_total=20, warmup=warmup, schedule=schedule)
            assert scheduled_lr(group, float(step)) == 0.5 * FACTORS[schedule](step / 20, warmup)
    assert scheduled_lr(dict(lr=0.5, t_total=-1, warmup=0.1, schedule=schedule), 3.0) == 0.5
    assert scheduled_lr(dict(lr=1.0, t_total=10, warmup=-1, schedule="warmup_linear"), 0.0) == 0.5
    assert scheduled_lr(dict(lr=1.0, t_total=10, warmup=-1, schedule="warmup_poly"), 12.0) == 0.0


def test_a_torch_npu_checkpoint_loads(seed: int) -> None:
    """A state_dict in torch_npu's NpuFusedBertAdam format (``step`` a Python int; its param groups'
    keys) loads into FusedBertAdam, which goes on as an uninterrupted reference run."""
    config = FLOAT64_CONFIGS["clipped_linear"]
    params, grads = _data(seed)
    leaves = [p.clone().requires_grad_() for p in params]
    optimizer = BertAdam(leaves, **config)
    for step in range(STEPS):
        if step == STEPS // 2:
            saved = optimizer.state_dict()
            for state in saved["state"].values():
                state["step"] = int(state["step"])
            assert set(saved["param_groups"][0]) == {
                "lr", "schedule", "warmup", "t_total", "b1", "b2", "e", "weight_decay", "max_grad_norm", "params"
            }  # fmt: skip
            optimizer = NpuFusedBertAdam(leaves, lr=1.0)
            optimizer.load_state_dict(saved)
        for leaf, grad in zip(leaves, grads[step]):
            leaf.grad = grad.clone()
        optimizer.step()
    *_, (want, *_) = _trajectory(BertAdam, config, seed)
    for mine, theirs in zip(leaves, want):
        assert torch.equal(mine.detach(), theirs), f"seed {seed}"


def test_torch_npu_signature() -> None:
    """NpuFusedBertAdam's parameters and defaults are torch_npu's; FusedBertAdam's are the same."""
    expected = dict(
        lr=inspect.Parameter.empty, warmup=-1, t_total=-1, schedule="warmup_linear", b1=0.9, b2=0.999, e=1e-6,
        weight_decay=0.01, max_grad_norm=1.0,
    )  # fmt: skip
    for cls in (NpuFusedBertAdam, FusedBertAdam, BertAdam):
        parameters = inspect.signature(cls).parameters
        got = {name: p.default for name, p in parameters.items() if name not in ("params", "foreach")}
        got["lr"] = inspect.Parameter.empty if "required" in repr(got["lr"]) else got["lr"]
        assert got == expected, cls.__name__
    with pytest.raises((TypeError, ValueError)):
        NpuFusedBertAdam([torch.nn.Parameter(torch.randn(2))])


def test_registered_by_name() -> None:
    import fused_core

    params = [torch.nn.Parameter(torch.randn(3))]
    assert type(fused_core.create_optimizer("bert_adam", params, lr=1e-3)) is FusedBertAdam
