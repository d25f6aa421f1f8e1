"""The plugin hooks are general: Signum, a tiny optimizer that is not SGD-shaped, registered
through the same hooks as an installed plugin, trains real models like its per-tensor
reference; registration errors name the plugin at fault."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_core
from fused_core import FusedOptimizer, PluginError, UnknownOptimizerError
from fused_testing import make_batches, make_model, relative_error, train_side_by_side

STEPS = 16


def _two_groups(model: nn.Module, lrs: tuple[float, float], betas: tuple[float, float], named: bool) -> list[dict]:
    """The last layer (its weight and bias) in a second group with its own lr and beta."""
    items = list(model.named_parameters())
    split = len(items) - 2
    groups = []
    for part, lr, beta in zip((items[:split], items[split:]), lrs, betas):
        params = part if named else [p for _, p in part]
        groups.append({"params": params, "lr": lr, "beta": beta})
    return groups


@pytest.mark.parametrize("model_kind", ["mlp", "convnet"])
def test_signum_trains_like_per_tensor_reference_fp32(signum, model_kind: str) -> None:
    """Real forward/backward/cross-entropy, two param groups with different lr and beta, and an
    lr schedule written into the group dicts between steps (as torch's schedulers do).
    convnet adds a channels_last conv weight and BatchNorm parameters."""
    lrs, betas = (1e-2, 3e-3), (0.9, 0.8)

    def decay(step: int, *optimizers: torch.optim.Optimizer) -> None:
        if step % 5 == 4:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5

    result = train_side_by_side(
        lambda model: signum.Reference(_two_groups(model, lrs, betas, named=False), lr=lrs[0]),
        lambda model: signum.Signum(_two_groups(model, lrs, betas, named=True), lr=lrs[0]),
        model_kind=model_kind,
        steps=STEPS,
        seed=3,
        between_steps=lambda step, a, b: decay(step, a, b),
    )
    assert result.max_relative_error <= 1e-6, result.per_param

    initial = make_model(model_kind, seed=3)
    reference_params = dict(result.model_a.named_parameters())
    for (name, param), (_, start) in zip(result.model_b.named_parameters(), initial.named_parameters()):
        assert not torch.equal(param, start), f"{name} never moved"
        ours = result.optimizer_b.state[param]["momentum"]
        theirs = result.optimizer_a.state[reference_params[name]]["momentum"]
        assert relative_error(ours, theirs) <= 1e-6, f"momentum of {name}"
    assert sum(p.numel() for p in initial.parameters()) > 5000


def _as(dtype: torch.dtype, *names: str):
    return {name: dtype for name in names}


# Parameter dtypes of the mlp (Linear 64->128, ReLU, Linear 128->128, ReLU, Linear 128->10),
# by parameter name; "mixed" puts fp16, fp32 and bf16 weights in the same param groups.
DTYPE_PLANS = {
    "fp16": _as(torch.float16, "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"),
    "bf16": _as(torch.bfloat16, "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"),
    "mixed": {
        **_as(torch.float16, "0.weight", "0.bias"),
        **_as(torch.float32, "2.weight", "2.bias"),
        **_as(torch.bfloat16, "4.weight", "4.bias"),
    },
}


def _forward(model: nn.Sequential, inputs: torch.Tensor) -> torch.Tensor:
    hidden = inputs
    for layer in model:
        weight = getattr(layer, "weight", None)
        hidden = layer(hidden.to(weight.dtype) if weight is not None else hidden)
    return hidden


@pytest.mark.parametrize("plan", list(DTYPE_PLANS))
def test_signum_low_precision_against_float64_reference(signum, plan: str) -> None:
    """Every step of a real training run, on fp16/bf16 (and mixed) parameters, against the
    float64 reference applied to the values the optimizer started that step from.

    Tolerance, per element: the kernel computes in fp32 and rounds once to the parameter's
    dtype, so it is within half an ulp of the exact result plus fp32 rounding (2^-24
    relative, and lr rounded to fp32): we allow one ulp, ``eps * |reference|``, plus the
    dtype's subnormal spacing (fp16 momenta can be subnormal) and ``lr * 2^-23``. A wrong
    group's lr or beta, a lost or re-initialised momentum, or a stale gradient are all
    off by far more. The betas are chosen exact in binary (0.5, 0.75) so that
    ``beta * m + (1 - beta) * g`` on fp16/bf16/fp32 inputs has the sign of the exact value
    in fp32 too (products exact, one rounding of the sum): sign(m) then agrees with the
    float64 reference exactly instead of flipping where m is within rounding of 0 (fp32
    parameters, in "mixed", get beta = 0.5 only: 0.75 * m is not exact for a 24-bit m).
    """
    model = make_model("mlp", seed=5)
    for name, param in model.named_parameters():
        param.data = param.data.to(DTYPE_PLANS[plan][name])
    betas = (0.5, 0.5) if plan == "mixed" else (0.75, 0.5)
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "lr": 1e-2, "beta": betas[0]},
        {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "lr": 4e-3, "beta": betas[1]},
    ]
    optimizer = signum.Signum(groups, lr=1.0)
    start = [p.detach().clone() for p in model.parameters()]

    for step, (inputs, targets) in enumerate(make_batches("mlp", STEPS, seed=6)):
        optimizer.zero_grad()
        F.cross_entropy(_forward(model, inputs).float(), targets).backward()
        before = {}
        for p in model.parameters():
            momentum = optimizer.state.get(p, {}).get("momentum")
            before[p] = (p.detach().double(), p.grad.double(), None if momentum is None else momentum.double())
        optimizer.step()
        for group in optimizer.param_groups:
            for index, p in enumerate(group["params"]):
                p64, g64, m64 = before[p]
                assert (m64 is None) == (step == 0)
                want_p, want_m = signum.reference_step(p64, g64, m64, group["lr"], group["beta"])
                finfo = torch.finfo(p.dtype)
                slack = finfo.eps * finfo.tiny + group["lr"] * 2.0**-23
                got_m = optimizer.state[p]["momentum"]
                assert got_m.dtype == p.dtype
                for what, got, want in (("param", p, want_p), ("momentum", got_m, want_m)):
                    excess = (got.double() - want).abs() - (finfo.eps * want.abs() + slack)
                    assert excess.max().item() <= 0, f"step {step}, group {group['lr']}, {index}: {what} {p.dtype}"
    for p, p0 in zip(model.parameters(), start):
        assert (p != p0).float().mean() > 0.5, "most elements must have moved"


def test_available_and_create_optimizer(signum, registry) -> None:
    assert "signum" not in registry.optimizers()
    registry.register_plugin(signum.plugin)
    assert registry.optimizers()["signum"] is signum.Signum
    assert registry.kernels.resolve("signum", torch.device("cpu"), torch.float32) is signum.kernel

    name = fused_core.register_plugin(signum.plugin)
    assert fused_core.register_plugin(signum.plugin) == name == "signum_test_plugin"  # idempotent
    assert "signum" in fused_core.available_optimizers()
    assert fused_core.available_optimizers() == sorted(fused_core.available_optimizers())

    generator = torch.Generator().manual_seed(11)
    values = [torch.randn(shape, generator=generator) for shape in ((300, 20), (4000,))]
    params = [nn.Parameter(v.clone()) for v in values]
    twins = [nn.Parameter(v.clone()) for v in values]
    optimizer = fused_core.create_optimizer("signum", params, lr=0.1, beta=0.9)
    assert type(optimizer) is signum.Signum
    assert optimizer.defaults == {"lr": 0.1, "beta": 0.9}
    reference = signum.Reference(twins, lr=0.1, beta=0.9)
    for _ in range(3):
        for p, twin in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=generator)
            twin.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, twin in zip(params, twins):
        assert relative_error(p, twin) <= 1e-6


def test_unknown_optimizer_lists_available_names(signum) -> None:
    fused_core.register_plugin(signum.plugin)
    with pytest.raises(UnknownOptimizerError) as info:
        fused_core.create_optimizer("nope", [nn.Parameter(torch.zeros(3))], lr=0.1)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'nope'" in message
    for name in fused_core.available_optimizers():
        assert name in message


def test_second_plugin_taking_the_name_is_an_error(signum) -> None:
    fused_core.register_plugin(signum.plugin)
    other = type("OtherSignum", (FusedOptimizer,), {"name": "signum", "hyperparameters": signum.Hyperparams})
    duplicate = signum.make_plugin("duplicate_signum_plugin", (other,))
    with pytest.raises(PluginError) as info:
        fused_core.register_plugin(duplicate)
    message = str(info.value)
    assert "duplicate_signum_plugin" in message
    assert "signum_test_plugin" in message  # and who owns the name
    assert "'signum'" in message
    assert fused_core.registry.optimizers()["signum"] is signum.Signum


def test_kernel_for_unknown_device_type_is_an_error(signum, registry) -> None:
    bad = signum.make_plugin("tpu_signum_plugin", kernels=(("signum", "tpu", signum.kernel),))
    with pytest.raises(PluginError) as info:
        registry.register_plugin(bad)
    assert "tpu_signum_plugin" in str(info.value)
    assert "'tpu'" in str(info.value)
    with pytest.raises(LookupError):
        registry.kernels.resolve("signum", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "registered, fragment",
    [(nn.Linear, "not a FusedOptimizer subclass"), (type("Nameless", (FusedOptimizer,), {}), "without a 'name'")],
    ids=["not-an-optimizer", "no-name"],
)
def test_registering_an_invalid_optimizer_names_the_plugin(signum, registry, registered: type, fragment: str) -> None:
    with pytest.raises(PluginError) as info:
        registry.register_plugin(signum.make_plugin("careless_plugin", (registered,)))
    assert "careless_plugin" in str(info.value)
    assert fragment in str(info.value)


def _rivals(signum):
    """plugin_a and plugin_b both register optimizer 'x' and a launcher for kernel 'x'."""

    def launcher_a(*args):
        raise AssertionError

    def launcher_b(*args):
        raise AssertionError

    first = type("First", (FusedOptimizer,), {"name": "x", "hyperparameters": signum.Hyperparams, "kernel": "x"})
    second = type("Second", (FusedOptimizer,), {"name": "x", "hyperparameters": signum.Hyperparams, "kernel": "x"})
    a = signum.make_plugin("plugin_a", (first,), (("x", "*", launcher_a),))
    b = signum.make_plugin("plugin_b", (second,), (("x", "*", launcher_b),))
    return a, b, first, launcher_a


def test_rejected_plugin_leaves_nothing_behind(signum, registry) -> None:
    """A rejected plugin is not half-registered: retrying is still an error, and its other hook
    (register_kernels) does not run later, at an unrelated registration, to replace the owner's
    launcher."""
    a, b, first, launcher_a = _rivals(signum)
    registry.register_plugin(a)
    for _ in range(2):
        with pytest.raises(PluginError, match="plugin_b"):
            registry.register_plugin(b)
    registry.register_plugin(signum.make_plugin("unrelated_plugin"))
    assert registry.optimizers()["x"] is first
    assert registry.kernels.resolve("x", torch.device("cpu"), torch.float32) is launcher_a


def test_registration_is_atomic(signum, registry) -> None:
    """An optimizer is not listed when its plugin's kernels are rejected (it could never step)."""
    other = type("Other", (FusedOptimizer,), {"name": "other", "hyperparameters": signum.Hyperparams, "kernel": "o"})
    with pytest.raises(PluginError, match="tpu_plugin"):
        registry.register_plugin(signum.make_plugin("tpu_plugin", (other,), (("o", "tpu", signum.kernel),)))
    assert "other" not in registry.optimizers()
