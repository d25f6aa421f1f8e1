"""The fused classes (and the per-tensor references) against the papers' math, written here once
more in float64 as plain functions of one parameter, on fresh random data.

Every step is compared from the values the optimizer started it with, so an error cannot hide in
accumulated rounding: within 1e-12 relative to the largest value in float64. The data is built
so that each branch is taken where a test says so (global clipping reached or not, a trust ratio
with a zero norm, the weight norm clamped, AdamP's projection per channel, per layer, or none),
and the tests assert that it was.
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_lamb import FusedAdamP, FusedLamb, NpuFusedAdamP, NpuFusedLamb
from fused_lamb.reference import AdamP, Lamb, NpuLamb

F64 = torch.float64
TOLERANCE = 1e-12


def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


# ----- Lamb: You et al. 2019, Algorithm 2 (apex's options, torch_npu's clamp and Adam mode) -----
def lamb_math(p, g, m, v, t, hp, global_norm):
    """One Lamb step of one parameter in float64: returns (p, m, v, trust ratio)."""
    beta1, beta2 = hp["betas"]
    if hp["max_grad_norm"] is not None and global_norm > hp["max_grad_norm"]:
        g = g / (global_norm / hp["max_grad_norm"])
    if not hp["adam_w_mode"]:
        g = g + hp["weight_decay"] * p
    m = beta1 * m + ((1 - beta1) if hp["grad_averaging"] else 1.0) * g
    v = beta2 * v + (1 - beta2) * g * g
    b1, b2 = (1 - beta1**t, 1 - beta2**t) if hp["bias_correction"] else (1.0, 1.0)
    u = (m / b1) / ((v / b2).sqrt() + hp["eps"])
    if hp["adam_w_mode"]:
        u = u + hp["weight_decay"] * p
    w, n = p.norm().item(), u.norm().item()
    if hp["max_weight_norm"] is not None:
        w = min(w, hp["max_weight_norm"])
    ratio = w / n if w > 0 and n > 0 else 1.0
    if hp["adam"] or (hp["weight_decay"] == 0 and not hp["use_nvlamb"]):
        ratio = 1.0
    return p - hp["lr"] * ratio * u, m, v, ratio


LAMB_DEFAULTS = dict(
    lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, adam_w_mode=True,
    grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False, adam=False, max_weight_norm=None,
)  # fmt: skip
NPU_LAMB = dict(LAMB_DEFAULTS, bias_correction=False, weight_decay=0.0, use_nvlamb=True, max_weight_norm=10.0)
NPU_NAMES = ("lr", "betas", "eps", "weight_decay", "adam")


def start_values(shapes, generator, scale=1.0):
    return [torch.randn(shape, generator=generator, dtype=F64) * scale for shape in shapes]


def check_lamb(factory, hp, shapes, *, grad_scale=1.0, weight_scale=1.0, zero=(), steps=4, expect=None):
    """Step ``factory``'s optimizer over parameters of ``shapes`` and compare every step with
    :func:`lamb_math` from the values it started from. ``zero``: parameters that start at zero.
    Returns the per-step (clipped, ratios) seen, for the caller's assertions on the branches."""
    generator = torch.Generator().manual_seed(seed())
    params = [torch.nn.Parameter(value) for value in start_values(shapes, generator, weight_scale)]
    for index in zero:
        params[index].data.zero_()
    optimizer = factory(params)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    seen = []
    for step in range(1, steps + 1):
        grads = start_values(shapes, generator, grad_scale)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        global_norm = torch.cat([g.flatten() for g in grads]).norm().item()
        optimizer.step()
        ratios = []
        for index, (p, g) in enumerate(zip(params, grads)):
            expected, m, v, ratio = lamb_math(before[index], g, *moments[index], step, hp, global_norm)
            moments[index] = (m, v)
            ratios.append(ratio)
            scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
            assert float((p.detach() - expected).abs().amax()) <= TOLERANCE * scale, (step, index, ratio)
            state = optimizer.state[p]
            torch.testing.assert_close(state["exp_avg"], m, rtol=TOLERANCE, atol=TOLERANCE)
            torch.testing.assert_close(state["exp_avg_sq"], v, rtol=TOLERANCE, atol=TOLERANCE)
            assert float(state["step"]) == step
        seen.append((hp["max_grad_norm"] is not None and global_norm > hp["max_grad_norm"], ratios))
    return seen


SHAPES = [(16, 8), (33,), (), (3, 5, 4)]
LAMB_CASES = {
    "apex_defaults_clipped": dict(),
    "not_clipped": dict(max_grad_norm=100.0),
    "l2_no_averaging_no_bias_correction": dict(
        weight_decay=0.1, adam_w_mode=False, grad_averaging=False, bias_correction=False, max_grad_norm=None
    ),
    "no_decay_no_ratio": dict(weight_decay=0.0, max_grad_norm=None),
    "nvlamb_clamped": dict(weight_decay=0.0, use_nvlamb=True, max_weight_norm=0.5, lr=1e-2),
    "adam": dict(adam=True, betas=(0.8, 0.99), eps=1e-3),
}


@pytest.mark.parametrize("impl", ["fused", "reference", "reference_foreach"])
@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_against_the_math(case: str, impl: str) -> None:
    hp = {**LAMB_DEFAULTS, "lr": 1e-2, **LAMB_CASES[case]}
    kwargs = {key: value for key, value in hp.items()}
    factory = {
        "fused": lambda params: FusedLamb(params, **kwargs),
        "reference": lambda params: Lamb(params, **kwargs),
        "reference_foreach": lambda params: Lamb(params, **kwargs, foreach=True),
    }[impl]
    seen = check_lamb(factory, hp, SHAPES, zero=(2,) if case == "nvlamb_clamped" else ())
    clipped = [was for was, _ in seen]
    ratios = [ratio for _, step_ratios in seen for ratio in step_ratios]
    if case == "apex_defaults_clipped":
        assert all(clipped)  # the global norm of ~170 elements of N(0, 1) is far above 1
    if case == "not_clipped":
        assert not any(clipped)
    if case in ("no_decay_no_ratio", "adam"):
        assert all(ratio == 1.0 for ratio in ratios)
    else:
        assert any(ratio != 1.0 for ratio in ratios)
    if case == "nvlamb_clamped":  # the zero parameter's ratio is 1 at its first step, then its norm is clamped
        assert seen[0][1][2] == 1.0 and all(step_ratios[0] < 1 for _, step_ratios in seen)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("use_global_grad_norm", [False, True])
@pytest.mark.parametrize("grad_scale", [1.0, 1e-3])
def test_npu_fused_lamb_is_torch_npus_math(impl: str, use_global_grad_norm: bool, grad_scale: float) -> None:
    """torch_npu's NpuFusedLamb: no bias correction, decoupled weight decay, the trust ratio for
    every parameter, the weight norm clamped to 10, and with use_global_grad_norm the gradients
    divided by the global norm where it exceeds 1 (not where it does not: grad_scale 1e-3)."""
    hp = dict(NPU_LAMB, lr=1e-2, weight_decay=1e-2, max_grad_norm=1.0 if use_global_grad_norm else None)
    cls = NpuFusedLamb if impl == "fused" else NpuLamb
    seen = check_lamb(
        lambda params: cls(params, lr=1e-2, weight_decay=1e-2, use_global_grad_norm=use_global_grad_norm),
        hp, [(64, 32), (7,)], grad_scale=grad_scale, weight_scale=3.0,
    )  # fmt: skip
    assert all(was == (use_global_grad_norm and grad_scale == 1.0) for was, _ in seen)
    # The 64x32 weight's norm (~135) is clamped to 10: its ratio is 10 / ||u||, far below ||θ|| / ||u||.
    assert all(step_ratios[0] < 1 for _, step_ratios in seen)


def test_zero_update_gives_ratio_one() -> None:
    """A parameter whose update is zero (zero gradient, zero state, no weight decay) keeps the ratio
    1 and does not move; nor does a zero parameter with zero gradient."""
    hp = dict(LAMB_DEFAULTS, weight_decay=0.0, use_nvlamb=True, max_grad_norm=None)
    params = [torch.nn.Parameter(torch.randn(5, dtype=F64)), torch.nn.Parameter(torch.zeros(3, dtype=F64))]
    optimizer = FusedLamb(params, **{key: value for key, value in hp.items()})
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.isfinite(p).all() for p in params)


# ----- AdamP: Heo et al. 2021, Algorithm 2, as clovaai/AdamP computes it -------------------------
def adamp_math(p, g, m, v, t, hp):
    """One AdamP step of one parameter in float64: returns (p, m, v, which view was projected)."""
    beta1, beta2 = hp["betas"]
    eps, delta = hp["eps"], hp["delta"]
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
    u = (beta1 * m + (1 - beta1) * g) / denom if hp["nesterov"] else m / denom
    projected, ratio = None, 1.0
    if p.dim() > 1 and p.numel() > 0:
        for view, rows in (("channel", p.shape[0]), ("layer", 1)):
            P, G = p.reshape(rows, -1), g.reshape(rows, -1)
            cosine = (P * G).sum(1).abs() / (G.norm(dim=1) + eps) / (P.norm(dim=1) + eps)
            if cosine.max() < delta / math.sqrt(P.shape[1]):
                unit = P / (P.norm(dim=1, keepdim=True) + eps)
                U = u.reshape(rows, -1)
                u = (U - unit * (unit * U).sum(1, keepdim=True)).reshape(p.shape)
                projected, ratio = view, hp["wd_ratio"]
                break
    if hp["weight_decay"] > 0:
        p = p * (1 - hp["lr"] * hp["weight_decay"] * ratio)
    return p - hp["lr"] / (1 - beta1**t) * u, m, v, projected


def orthogonal_rows(p, g):
    """``g`` with each row's component along ``p``'s row removed: every channel cosine ~0."""
    P, G = p.reshape(p.shape[0], -1), g.reshape(p.shape[0], -1)
    return (G - P * (G * P).sum(1, keepdim=True) / (P * P).sum(1, keepdim=True)).reshape(p.shape)


def orthogonal_overall(p, g, generator):
    """Rows strongly along ``p``'s rows, with signs that cancel over the whole parameter: channel
    cosines large, the layer cosine ~0."""
    P = p.reshape(p.shape[0], -1)
    signs = torch.where(torch.arange(P.shape[0]) % 2 == 0, 1.0, -1.0).to(F64)
    along = P * (signs / (P * P).sum(1)).unsqueeze(1)  # <along_c, p_c> = ±1
    along[-1] -= P[-1] * (signs.sum() / (P[-1] * P[-1]).sum())  # the dots now sum to 0
    G = 3 * along + 1e-3 * orthogonal_rows(p, g).reshape(P.shape) / P.norm(dim=1, keepdim=True)
    G -= P * ((G * P).sum() / (P * P).sum())  # exactly orthogonal overall
    return G.reshape(p.shape)


def layouts(generator):
    """A contiguous matrix, a transposed one, a channels_last conv weight, a 3-d tensor whose rows
    are scattered in memory, a bias and a 0-dim scalar: the memory orders fused_lamb.layerwise.Channels
    must read rows from."""
    conv = torch.randn(6, 3, 3, 3, generator=generator, dtype=F64).to(memory_format=torch.channels_last)
    scattered = torch.randn(4, 5, 6, generator=generator, dtype=F64).permute(1, 0, 2).contiguous().permute(1, 0, 2)
    return [
        torch.randn(12, 20, generator=generator, dtype=F64),
        torch.randn(20, 12, generator=generator, dtype=F64).t(),
        conv,
        scattered,
        torch.randn(12, generator=generator, dtype=F64),
        torch.randn((), generator=generator, dtype=F64),
    ]


def check_adamp(factory, hp, gradients, steps=3):
    """Step over :func:`layouts` with gradients from ``gradients(p, g, generator)``, comparing every
    step with :func:`adamp_math`; returns the views projected per step and parameter."""
    generator = torch.Generator().manual_seed(seed())
    params = [torch.nn.Parameter(value) for value in layouts(generator)]
    strides = [p.stride() for p in params]
    optimizer = factory(params)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    seen = []
    for step in range(1, steps + 1):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=generator, dtype=F64)
            grads.append(gradients(p.detach(), g, generator) if p.dim() > 1 else g)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        optimizer.step()
        views = []
        for index, (p, g) in enumerate(zip(params, grads)):
            expected, m, v, view = adamp_math(before[index], g, *moments[index], step, hp)
            moments[index] = (m, v)
            views.append(view)
            scale = max(float(expected.abs().max()), 1.0)
            assert float((p.detach() - expected).abs().max()) <= TOLERANCE * scale, (step, index, view)
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], m, rtol=TOLERANCE, atol=TOLERANCE)
            torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], v, rtol=TOLERANCE, atol=TOLERANCE)
        seen.append(views)
    assert [p.stride() for p in params] == strides
    return seen


ADAMP_GRADIENTS = {
    "channel": lambda p, g, generator: orthogonal_rows(p, g),
    "layer": orthogonal_overall,
    None: lambda p, g, generator: p + 0.1 * g,
}
ADAMP_DEFAULTS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=False)


@pytest.mark.parametrize("impl", ["fused", "npu", "reference", "reference_foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("projection", ["channel", "layer", None])
def test_adamp_against_the_math(projection: str | None, nesterov: bool, impl: str) -> None:
    hp = dict(ADAMP_DEFAULTS, nesterov=nesterov)
    factory = {
        "fused": lambda params: FusedAdamP(params, **hp),
        "npu": lambda params: NpuFusedAdamP(params, **hp),
        "reference": lambda params: AdamP(params, **hp),
        "reference_foreach": lambda params: AdamP(params, **hp, foreach=True),
    }[impl]
    seen = check_adamp(factory, hp, ADAMP_GRADIENTS[projection])
    for views in seen:  # the matrices took the branch the gradients were built for; the others none
        assert views == [projection] * 4 + [None, None]
