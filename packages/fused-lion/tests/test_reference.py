"""Lion's math against the paper, in float64, and what the reference and FusedLion promise besides.

* The reference (both ``foreach`` paths) and FusedLion in float64 follow the paper's Algorithm 2
  (arXiv:2302.06675), written here from the paper: ``c = β1 m + (1 - β1) g``,
  ``θ = θ - γ (sign(c) + λ θ)``, ``m = β2 m + (1 - β2) g``, to float64 rounding.
* ``foreach=True`` gives the per-tensor path's bits (fp32, fp64).
* fp16/bf16: every FusedLion step is the float64 step from the values it started at, rounded once.
* ``sign(0) = 0``; ``maximize`` is the step of the negated gradient; a state_dict saved without
  ``maximize``/``foreach`` (the paper's Lion) loads and continues as the reference.
"""

from __future__ import annotations

import pytest
import torch

from fused_lion import FusedLion
from fused_lion.reference import Lion

STEPS = 6
SHAPES = ((33, 17), (1000,), (), (5, 0), (4096,))
CONFIGS = {
    "defaults": dict(),
    "wd": dict(lr=3e-2, weight_decay=0.5),
    "betas_maximize": dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1, maximize=True),
    "beta1_zero": dict(lr=1e-2, betas=(0.0, 0.99), weight_decay=1.0),
    "tensor_lr": dict(lr=torch.tensor(2e-2, dtype=torch.float64), weight_decay=0.2),
}


@pytest.fixture
def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


def paper_step(theta, g, m, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    """Algorithm 2 of the paper (with torch's maximize): the new (θ, m), in float64."""
    beta1, beta2 = betas
    g = -g if maximize else g
    c = beta1 * m + (1 - beta1) * g
    return theta - float(lr) * (torch.sign(c) + weight_decay * theta), beta2 * m + (1 - beta2) * g


def _data(seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES] for _ in range(STEPS)]
    return [p.to(dtype) for p in params], [[g.to(dtype) for g in step] for step in grads]


def _trajectory(make, config: dict, seed: int, dtype=torch.float64):
    """Parameters and exp_avg after each step of optimizer ``make`` (params, **config)."""
    params, grads = _data(seed, dtype)
    leaves = [p.clone().requires_grad_() for p in params]
    optimizer = make(leaves, **config)
    for step in range(STEPS):
        for leaf, grad in zip(leaves, grads[step]):
            leaf.grad = grad.clone()
        optimizer.step()
        yield [leaf.detach().clone() for leaf in leaves], [optimizer.state[leaf]["exp_avg"].clone() for leaf in leaves]


MAKERS = {
    "reference": Lion,
    "reference-foreach": lambda params, **config: Lion(params, foreach=True, **config),
    "FusedLion": FusedLion,
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("maker", MAKERS.keys())
def test_float64_follows_the_paper(maker: str, config: dict, seed: int) -> None:
    """In float64, every step is the paper's update of the previous step's values (no rounding
    anywhere but float64's), so a wrong coefficient, order or sign fails by far more than 1e-12."""
    params, grads = _data(seed)
    theta, m = params, [torch.zeros_like(p) for p in params]
    for step, (got_params, got_state) in enumerate(_trajectory(MAKERS[maker], config, seed)):
        theta, m = zip(*(paper_step(t, g, v, **config) for t, g, v in zip(theta, grads[step], m)))
        for name, got, want in (("param", got_params, theta), ("exp_avg", got_state, m)):
            for mine, paper in zip(got, want):
                assert mine.shape == paper.shape
                error = float((mine - paper).abs().max()) if mine.numel() else 0.0
                assert error <= 1e-12, f"{maker} step {step + 1} {name}: {error:.3e} from the paper, seed {seed}"
                theta_ok = got_params  # the next step starts from what the optimizer holds
        theta, m = theta_ok, got_state


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_foreach_gives_the_per_tensor_bits(dtype: torch.dtype, config: dict, seed: int) -> None:
    """The benchmark's competitor (foreach=True) computes what the per-tensor reference computes, in
    fp32 and fp64 (in bf16, torch 2.13's CPU ``_foreach_mul_`` rounds some products otherwise than
    ``mul_``)."""
    config = dict(config, lr=torch.tensor(float(config["lr"]))) if "lr" in config else config
    for (pa, sa), (pb, sb) in zip(_trajectory(MAKERS["reference-foreach"], config, seed, dtype),
                                  _trajectory(Lion, config, seed, dtype)):  # fmt: skip
        for mine, theirs in zip(pa + sa, pb + sb):
            assert torch.equal(mine, theirs), f"seed {seed}"


@pytest.mark.parametrize("config", [CONFIGS["wd"], CONFIGS["betas_maximize"]], ids=["wd", "betas_maximize"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_steps_are_the_float64_step_rounded_once(dtype: torch.dtype, config: dict, seed: int) -> None:
    """fp16/bf16: each step, from the values FusedLion holds, is the float64 step of the paper rounded
    once to the dtype: within half an ulp of it, plus what fp32 arithmetic on the way may add (a few
    2^-24 of the terms summed), parameters and exp_avg. A per-op fp16 computation (the reference's)
    rounds twice or more and fails this. Elements whose ``c`` is zero to within fp32's rounding (low-
    precision values make ``g = -9 m`` exactly possible) may step either way, and are left out."""
    params, grads = _data(seed, dtype)
    leaves = [p.clone().requires_grad_() for p in params]
    optimizer = FusedLion(leaves, **config)
    states = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    (beta1, beta2), lr = config.get("betas", (0.9, 0.99)), float(config["lr"])
    for step in range(STEPS):
        before = [leaf.detach().double() for leaf in leaves]
        for leaf, grad in zip(leaves, grads[step]):
            leaf.grad = grad.clone()
        optimizer.step()
        for i, (leaf, theta, g, m) in enumerate(zip(leaves, before, grads[step], states)):
            want_theta, want_m = paper_step(theta, g.double(), m, **config)
            got_m = optimizer.state[leaf]["exp_avg"].double()
            g64 = -g.double() if config.get("maximize") else g.double()
            terms = {"param": theta.abs() + lr, "exp_avg": beta2 * m.abs() + (1 - beta2) * g64.abs()}
            c = beta1 * m + (1 - beta1) * g64
            decided = c.abs() > (beta1 * m.abs() + (1 - beta1) * g64.abs()) * 2.0**-22
            for name, got, want in (("param", leaf.detach().double(), want_theta), ("exp_avg", got_m, want_m)):
                finfo = torch.finfo(dtype)  # half an ulp of the value (subnormals: of the smallest normal)
                allowed = want.abs().clamp_min(finfo.smallest_normal) * finfo.eps / 2 + terms[name] * 2.0**-22
                ratio = torch.where(decided | (name != "param"), (got - want).abs() / allowed, 0.0)
                worst = float(ratio.max()) if want.numel() else 0.0
                assert worst <= 1, f"{dtype} step {step + 1} parameter {i} {name}: {worst:.3f} of allowed, seed {seed}"
            states[i] = got_m


def test_sign_of_zero_is_zero() -> None:
    """c = 0 (a zero gradient at the first step): no step but the weight decay, as sign(0) = 0."""
    for cls in (FusedLion, Lion):
        param = torch.nn.Parameter(torch.randn(100, dtype=torch.float64))
        start = param.detach().clone()
        optimizer = cls([param], lr=0.1, weight_decay=0.5)
        param.grad = torch.zeros_like(param)
        optimizer.step()
        assert torch.equal(param.detach(), start * (1 - 0.1 * 0.5)), cls.__name__


@pytest.mark.parametrize("cls", [FusedLion, Lion])
def test_maximize_is_the_step_of_the_negated_gradient(cls, seed: int) -> None:
    a, b = (_trajectory(cls, dict(lr=1e-2, weight_decay=0.1, maximize=flag), seed) for flag in (True, False))
    params, grads = _data(seed)
    negated = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = cls(negated, lr=1e-2, weight_decay=0.1)
    for step, (got_params, _) in enumerate(a):
        for leaf, grad in zip(negated, grads[step]):
            leaf.grad = -grad
        optimizer.step()
        for mine, theirs in zip(got_params, negated):
            assert torch.equal(mine, theirs.detach()), f"seed {seed}"
    assert next(b) is not None


def test_a_state_dict_without_maximize_and_foreach_loads(seed: int) -> None:
    """A checkpoint of the paper's Lion (param groups: lr, betas, weight_decay) loads into FusedLion
    and into the reference, and both go on as an uninterrupted reference run."""
    params, grads = _data(seed)
    runs = {}
    for name, cls in (("reference", Lion), ("fused", FusedLion)):
        leaves = [p.clone().requires_grad_() for p in params]
        first = Lion(leaves, lr=1e-2, weight_decay=0.1)
        for step in range(STEPS):
            if step == STEPS // 2:
                saved = first.state_dict()
                for group in saved["param_groups"]:
                    del group["maximize"], group["foreach"]
                first = cls(leaves)
                first.load_state_dict(saved)
                assert first.param_groups[0]["maximize"] is False
            for leaf, grad in zip(leaves, grads[step]):
                leaf.grad = grad.clone()
            first.step()
        runs[name] = [leaf.detach() for leaf in leaves]
    uninterrupted, *_ = list(_trajectory(Lion, dict(lr=1e-2, weight_decay=0.1), seed))[-1:]
    for name, got in runs.items():
        for mine, theirs in zip(got, uninterrupted[0]):
            assert torch.equal(mine, theirs), f"{name}, seed {seed}"
