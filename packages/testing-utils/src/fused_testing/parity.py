"""Train two optimizers side by side on identical models and compare the result.

Both models are built from the same seed and see the same batches; each step is
``zero_grad -> forward -> cross-entropy -> backward -> step`` with real autograd,
so the optimizer under test meets the gradients (layouts, dtypes, ``None``
grads after ``zero_grad(set_to_none=True)``) that training produces. Optimizer
``a`` is the reference: per parameter the error is
``relative_error(param_b, param_a)`` (see :mod:`fused_testing.reference`).

The model is one of :data:`MODEL_KINDS` or any zero-argument builder, and the
batches are random ones from :func:`make_batches` or any iterable of
``(inputs, targets)`` (a real dataset, epoch after epoch). The two optimizers
step in turn on each batch, so ``time_steps=True`` measures both under the same
conditions.

On accelerators, bit-identical results also require deterministic kernels
(``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_testing.reference import relative_error

__all__ = [
    "MODEL_KINDS",
    "ParityResult",
    "assert_parity",
    "make_batches",
    "make_model",
    "mlp",
    "train_side_by_side",
]

NUM_CLASSES = 10


def mlp(in_features: int = 64, width: int = 128, depth: int = 2, num_classes: int = NUM_CLASSES) -> nn.Module:
    """``depth`` hidden ``Linear(width) + ReLU`` layers, then a linear classifier.

    ``depth=0`` is a linear classifier. Two tensors per ``Linear``: a deep,
    narrow MLP has many small parameters, where a per-tensor optimizer pays
    most.
    """
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def _convnet() -> nn.Module:
    # The second conv keeps its weight in channels_last, so a fused optimizer
    # must preserve non-default strides when it re-points storage.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1).to(memory_format=torch.channels_last),  # type: ignore[call-overload]
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, NUM_CLASSES),
    )


ModelBuilder = Callable[[], nn.Module]
"""Builds a model on the CPU in float32, drawing its initial weights from torch's global RNG."""

# kind -> (builder, shape of one input sample)
MODEL_KINDS: dict[str, tuple[ModelBuilder, tuple[int, ...]]] = {
    "mlp": (mlp, (64,)),
    "convnet": (_convnet, (3, 8, 8)),
    "deep-mlp": (lambda: mlp(in_features=32, width=32, depth=15), (32,)),
}


def _kind(model_kind: str) -> tuple[ModelBuilder, tuple[int, ...]]:
    try:
        return MODEL_KINDS[model_kind]
    except KeyError:
        raise ValueError(f"unknown model kind {model_kind!r}; expected one of {sorted(MODEL_KINDS)}") from None


def make_model(
    kind: str | ModelBuilder = "mlp",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A classifier of the given kind (or from the given builder), initialised from ``seed``.

    Built on the CPU in float32 and then moved, so a seed gives the same
    initial weights on every device; the global RNG state is left untouched.
    """
    build = kind if callable(kind) else _kind(kind)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(device=device, dtype=dtype)


def make_batches(
    model_kind: str,
    n_steps: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[tuple[Tensor, Tensor]]:
    """``n_steps`` batches of (standard-normal inputs, class targets in [0, 10))."""
    _, sample_shape = _kind(model_kind)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_steps):
        inputs = torch.randn((batch_size, *sample_shape), generator=generator)
        targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        batches.append((inputs.to(device=device, dtype=dtype), targets.to(device=device)))
    return batches


@dataclass
class ParityResult:
    """What :func:`train_side_by_side` observed; ``a`` is the reference.

    ``step_seconds_a``/``_b`` hold the wall time of each ``optimizer.step()``
    when the harness was asked to time steps, and are empty otherwise.
    """

    max_relative_error: float
    per_param: dict[str, float]
    losses_a: list[float]
    losses_b: list[float]
    model_a: nn.Module
    model_b: nn.Module
    optimizer_a: torch.optim.Optimizer
    optimizer_b: torch.optim.Optimizer
    step_seconds_a: list[float] = field(default_factory=list)
    step_seconds_b: list[float] = field(default_factory=list)


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (``torch.cuda`` / ``torch.npu``); nothing to wait for on the CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    set_to_none: bool | None,
    step_seconds: list[float] | None,
) -> float:
    if set_to_none is None:
        optimizer.zero_grad()
    else:
        optimizer.zero_grad(set_to_none=set_to_none)
    inputs, targets = batch
    # The loss is taken in float32 so low-precision models differ only in
    # their own arithmetic, not in a half-precision softmax.
    loss = F.cross_entropy(model(inputs).float(), targets)
    loss.backward()
    if step_seconds is None:
        optimizer.step()
    else:
        # Only the step is timed, from an idle device to an idle device.
        device = inputs.device
        _synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        _synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    return loss.item()


def train_side_by_side(
    make_optimizer_a: OptimizerFactory,
    make_optimizer_b: OptimizerFactory,
    *,
    model_kind: str | ModelBuilder = "mlp",
    steps: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    zero_grad_set_to_none: bool | None = None,
    between_steps: Callable[[int, torch.optim.Optimizer, torch.optim.Optimizer], None] | None = None,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    time_steps: bool = False,
) -> ParityResult:
    """Train identical models with optimizers ``a`` and ``b``; compare parameters.

    ``model_kind`` names one of :data:`MODEL_KINDS` or is a zero-argument
    builder; either way both models are built from ``seed`` (see
    :func:`make_model`). Each factory receives its model, so it may use
    ``parameters()``, ``named_parameters()`` or build param groups.

    ``batches`` is any iterable of ``(inputs, targets)``, consumed once; each
    batch is moved to ``device`` (floating-point inputs also to ``dtype``) and
    fed to both models. Without it, ``make_batches`` draws random ones (which
    needs a named ``model_kind``). ``steps`` caps the number of steps; ``None``
    means every given batch, or 15 random ones.

    ``zero_grad_set_to_none`` ``None`` means each optimizer's default.
    ``between_steps(i, opt_a, opt_b)`` runs after step ``i`` (e.g. to advance
    LR schedulers). ``time_steps`` records the wall time of every ``step()``,
    with the device synchronised before and after it, in
    ``ParityResult.step_seconds_a``/``_b``.
    """
    device = torch.device(device)
    model_a = make_model(model_kind, seed=seed, dtype=dtype, device=device)
    model_b = make_model(model_kind, seed=seed, dtype=dtype, device=device)
    optimizer_a = make_optimizer_a(model_a)
    optimizer_b = make_optimizer_b(model_b)
    losses_a: list[float] = []
    losses_b: list[float] = []
    seconds_a: list[float] | None = [] if time_steps else None
    seconds_b: list[float] | None = [] if time_steps else None
    if batches is None:
        if callable(model_kind):
            raise ValueError("a model builder needs batches: pass batches=[(inputs, targets), ...]")
        batches = make_batches(model_kind, 15 if steps is None else steps, seed=seed + 1, dtype=dtype, device=device)
    elif steps is not None:
        batches = itertools.islice(batches, steps)
    for i, (inputs, targets) in enumerate(batches):
        inputs = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)
        batch = (inputs, targets.to(device=device))
        losses_a.append(_train_step(model_a, optimizer_a, batch, zero_grad_set_to_none, seconds_a))
        losses_b.append(_train_step(model_b, optimizer_b, batch, zero_grad_set_to_none, seconds_b))
        if between_steps is not None:
            between_steps(i, optimizer_a, optimizer_b)

    params_b = dict(model_b.named_parameters())
    per_param = {name: relative_error(params_b[name], param_a) for name, param_a in model_a.named_parameters()}
    return ParityResult(
        max_relative_error=max(per_param.values(), default=0.0),
        per_param=per_param,
        losses_a=losses_a,
        losses_b=losses_b,
        model_a=model_a,
        model_b=model_b,
        optimizer_a=optimizer_a,
        optimizer_b=optimizer_b,
        step_seconds_a=seconds_a or [],
        step_seconds_b=seconds_b or [],
    )


def assert_parity(result: ParityResult, rtol: float, *, show: int = 5) -> None:
    """Raise ``AssertionError`` naming the ``show`` worst parameters if any exceeds ``rtol``."""
    if result.max_relative_error <= rtol:
        return
    worst = sorted(result.per_param.items(), key=lambda item: item[1], reverse=True)[:show]
    lines = "\n".join(f"  {name}: {error:.3e}" for name, error in worst)
    raise AssertionError(
        f"max relative error {result.max_relative_error:.3e} exceeds rtol {rtol:.1e}; worst parameters:\n{lines}"
    )
