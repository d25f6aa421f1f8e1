r"""A conformance suite for fused optimizers: subclass it in a test module and pytest runs it.

Like torch's ``OptimizerInfo`` tests, one class attribute block checks an optimizer against a
reference implementation (typically ``torch.optim.X(foreach=False)``) on everything users rely
on. Subclass :class:`OptimizerConformance` in a test module (the class name must start with
``Test``), and pytest collects its ``test_*`` methods, parametrised over your configs::

    # tests/test_conformance.py
    import functools

    import torch

    from fused_testing.conformance import OptimizerConformance
    from my_plugin import FusedSGD


    class TestFusedSGDConformance(OptimizerConformance):
        optimizer_cls = FusedSGD
        reference_cls = functools.partial(torch.optim.SGD, foreach=False)
        configs = {  # a list of dicts works too (ids are then made from the values)
            "plain": dict(lr=0.1),
            "momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
            "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
            "dampening_maximize": dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
        }
        state_keys = ("momentum_buffer",)  # compared with the reference's, value and presence
        exact_dtypes = (torch.float32, torch.float64)  # bit for bit there; rtol elsewhere
        bad_hyperparameters = [
            (dict(lr=-1.0), ValueError),
            (dict(momentum=0.0, nesterov=True), (ValueError, TypeError)),
        ]
        # Optional: a known difference, as a strict xfail (by test name, or name[id]).
        expected_failures = {"test_dtype_change[momentum_wd]": "state follows the parameters' dtype"}

Run it with ``pytest tests/test_conformance.py``: each test id names its config (and dtype,
scheduler...), e.g. ``TestFusedSGDConformance::test_parity[nesterov-float32]``. Importing this
module does not import pytest (it is in the ``test`` extra); only collection does, in
``pytest_generate_tests``. Every test method can also be called directly with its arguments
(a config dict, a dtype, ...), e.g. ``TestFusedSGDConformance().test_parity(config, torch.float32)``;
a failure is an ``AssertionError`` naming the parameter, the step and the seed.

**What is checked** (``config`` ranges over ``configs``; every run compares parameters, every
``state_keys`` entry (dtype, values, and presence: no state where the reference has none) and the
gradients (``step()`` must neither replace nor modify them) with the reference after each step;
outside ``test_parity`` and ``test_low_precision`` the parameters are :data:`LIGHT_PARAMS`, the
same kinds with a 64x32 layer, in ``dtype`` (default fp32)):

* ``test_parity[config-dtype]``: ``steps`` steps over :data:`DEFAULT_PARAMS`, every ``dtypes``
  entry; bit for bit in ``exact_dtypes``, else within ``rtol`` (max-abs error relative to the
  largest element). The parameters are a 0-dim one, empty ones (``(0,)`` and ``(4, 0)``), a
  transposed (non-contiguous) one with transposed gradients, a contiguous one with transposed
  gradients, a realistic 512x256 layer and its bias, an odd-sized one, one that never gets a
  gradient, one whose gradients arrive late (from step 3) and one frozen (no gradient,
  ``requires_grad=False``) for steps 2-3, then unfrozen. A first ``step()`` with no gradients
  at all must change nothing. Strides and dtypes must be kept.
* ``test_low_precision[config-dtype]`` (``low_precision_dtypes``, default fp16 and bf16), over
  the same parameters: no worse than the reference in the same dtype, both measured against a
  float64 oracle fed the same gradients. After step ``k``, for the values and each
  ``state_keys`` entry: per parameter, ``err(optimizer) <= err(reference) + low_precision_ulps *
  eps * k * S`` (``err``: max |difference| from the oracle; ``S``: the largest |oracle value| so
  far; a single element may be a few roundings off by chance, where the reference got lucky),
  and over all parameters, ``mean|error|(optimizer) <= (1 + low_precision_mean_slack) *
  mean|error|(reference)``. The oracle is the reference class itself run on float64 copies
  (:class:`~fused_testing.oracle.Float64Oracle`: the generic oracle for any update), or, when
  ``oracle_update`` is set, that hand-written per-parameter update applied in float64
  (:func:`~fused_testing.oracle.oracle_step`: ``oracle_update(param, grad, state, **config)``).
* ``test_state_dict_to_reference``, ``test_state_dict_from_reference``: the optimizer's
  state_dict, saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``, has
  the reference's format (same state entries and keys, same param-group keys and values) and
  loads into the reference, which then continues as an uninterrupted reference run; and the
  other way round. ``test_checkpoint_resume``: a model and optimizer checkpoint loaded into a
  new model and a new optimizer continues as the uninterrupted reference.
* ``test_reallocation``: ``p.data = p.data.clone()`` on some parameters, then a
  ``model.to(other dtype).to(dtype)`` round trip, between steps.
* ``test_dtype_change``: steps after ``model.to(other_dtype)``, then after moving back: the state
  torch.optim created before keeps its dtype (the reference's state is compared, dtype included).
* ``test_lr_scheduler[config-scheduler]``: every entry of ``schedulers`` (default ``StepLR``
  and ``OneCycleLR``, whose momentum cycling is on when the optimizer's defaults have
  ``momentum`` or ``betas``: see :func:`one_cycle_lr`).
* ``test_zero_grad[config-mode]``: real backward passes (two accumulated per step) with
  ``zero_grad(set_to_none=True)``, ``False``, or alternating, between steps: gradients must be
  None, or zeros kept in the same tensor objects, exactly where the reference's are.
  ``test_zero_grad_default[config]``: ``zero_grad()`` with no argument behaves as
  ``zero_grad_set_to_none_default`` says (torch: True).
* ``test_bad_hyperparameters[case]``: each ``bad_hyperparameters`` dict, merged into the first
  config, makes the constructor raise one of the given exception types (at least one case is
  required: collection raises TypeError for a class without, rather than skip the test).
* ``test_copy[config-pickle|deepcopy]``: an optimizer with state, pickled or deep-copied, equals
  the original, and both go on stepping as the reference (independently).
* ``test_closure``: ``step(closure)`` returns the closure's loss and steps as the reference;
  ``test_param_groups``: two param groups, the second with ``second_group`` overrides.

**Random data.** Every test draws a fresh seed with ``torch.randint`` and names it in its
failure messages; set the environment variable ``FUSED_TESTING_SEED`` (or the class attribute
``seed``) to rerun with that data.

**Budget.** With the defaults (5 steps; ~137k elements in ``test_parity`` and
``test_low_precision``, ~6k elsewhere) a four-config suite is 76 tests plus the
``bad_hyperparameters`` cases: FusedSGD's runs in about 7 s on one CPU thread (the first step
of a fused optimizer may add its kernel's load or build). Fewer ``configs`` or ``dtypes``, a
smaller ``param_specs`` or fewer ``steps`` make it cheaper.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import io
import itertools
import math
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fused_testing.oracle import Float64Oracle, UpdateFn, UpdateOracle

__all__ = [
    "DEFAULT_PARAMS",
    "LIGHT_PARAMS",
    "SEED_ENV",
    "OptimizerConformance",
    "ParamSpec",
    "draw_seed",
    "one_cycle_lr",
    "step_lr",
]

SEED_ENV = "FUSED_TESTING_SEED"
"""Environment variable: the seed every conformance test uses instead of a fresh one."""

Optimizer = torch.optim.Optimizer
OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer, int], Any]
ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


# ----- parameters -------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the conformance runs.

    Args:
        name: its name in the test model (and in failure messages).
        shape: its shape.
        grads: when it has a gradient: ``"always"``; ``"never"``; ``"late"`` (from the third
            step on); ``"frozen"`` (none, and ``requires_grad=False``, at the second and third
            steps; a gradient before and after).
        transposed: the parameter's strides are those of a transposed tensor (2-d or more).
        grad_transposed: its gradients' strides are those of a transposed tensor.
    """

    name: str
    shape: tuple[int, ...]
    grads: str = "always"
    transposed: bool = False
    grad_transposed: bool = False

    def has_grad(self, step: int) -> bool:
        """Whether it gets a gradient at ``step`` (0-based)."""
        if self.grads == "always":
            return True
        if self.grads == "never":
            return False
        if self.grads == "late":
            return step >= 2
        if self.grads == "frozen":
            return step not in (1, 2)
        raise ValueError(f"ParamSpec {self.name!r}: unknown gradient schedule {self.grads!r}")


DEFAULT_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("scalar", ()),
    ParamSpec("empty", (0,)),
    ParamSpec("empty_2d", (4, 0)),
    ParamSpec("weight", (512, 256)),
    ParamSpec("bias", (512,)),
    ParamSpec("transposed", (48, 40), transposed=True, grad_transposed=True),
    ParamSpec("transposed_grad", (40, 48), grad_transposed=True),
    ParamSpec("odd", (1027,)),
    ParamSpec("no_grad", (7, 5), grads="never"),
    ParamSpec("late", (33,), grads="late"),
    ParamSpec("frozen", (17, 3), grads="frozen"),
)
"""The parameters of ``test_parity`` and ``test_low_precision``: 0-dim, empty, non-contiguous, a
realistic layer, odd-sized, without gradients, with late gradients, frozen then unfrozen."""

LIGHT_PARAMS: tuple[ParamSpec, ...] = tuple(
    dataclasses.replace(spec, shape={"weight": (64, 32), "bias": (64,)}.get(spec.name, spec.shape))
    for spec in DEFAULT_PARAMS
)
"""The same kinds with a 64x32 layer, for the other tests (cheaper: what they check is not size)."""


def draw_seed(fixed: int | None = None) -> int:
    """``$FUSED_TESTING_SEED`` if set, else ``fixed`` if given, else a fresh ``torch.randint`` draw."""
    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    if fixed is not None:
        return fixed
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _with_layout(tensor: Tensor, dtype: torch.dtype, device: torch.device, transposed: bool) -> Tensor:
    """A copy of ``tensor`` (not a view) in ``dtype`` on ``device``, with transposed strides if asked
    and possible."""
    if transposed and tensor.dim() >= 2:
        return tensor.mT.to(device=device, dtype=dtype, memory_format=torch.contiguous_format).mT.clone()
    return tensor.to(device=device, dtype=dtype, copy=True)


class _Case:
    """The data of one test: initial values and every step's gradients, from one seed."""

    def __init__(self, specs: Sequence[ParamSpec], device: torch.device, seed: int) -> None:
        self.specs = tuple(specs)
        self.device = device
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.initial = [torch.randn(spec.shape, generator=generator, dtype=torch.float64) for spec in self.specs]
        self._grads: dict[int, list[Tensor]] = {}

    def params(self, dtype: torch.dtype) -> list[nn.Parameter]:
        """Fresh leaf parameters with the initial values, in ``dtype``, with each spec's strides."""
        return [
            nn.Parameter(_with_layout(value, dtype, self.device, spec.transposed))
            for spec, value in zip(self.specs, self.initial)
        ]

    def _values(self, step: int) -> list[Tensor]:
        if step not in self._grads:
            generator = torch.Generator().manual_seed(self.seed + 7919 * (step + 1))
            self._grads[step] = [
                torch.randn(spec.shape, generator=generator, dtype=torch.float64) for spec in self.specs
            ]
        return self._grads[step]

    def grads(self, step: int, dtype: torch.dtype) -> list[Tensor | None]:
        """Fresh gradient tensors for ``step`` (None where the spec has none then)."""
        return [
            _with_layout(value, dtype, self.device, spec.grad_transposed) if spec.has_grad(step) else None
            for spec, value in zip(self.specs, self._values(step))
        ]

    def weights(self, step: int, dtype: torch.dtype) -> list[Tensor]:
        """The coefficients of step ``step``'s loss (see :meth:`loss`)."""
        return [value.to(dtype).to(self.device) for value in self._values(step)]

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        """``sum(w * p) + 0.5 * sum(p * p)`` over the parameters that have a gradient at ``step``:
        a real backward pass whose gradients depend on the parameters."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for spec, param, weight in zip(self.specs, params, self.weights(step, params[0].dtype)):
            if spec.has_grad(step):
                total = total + (weight * param).sum() + 0.5 * (param * param).sum()
        return total


@dataclass(frozen=True)
class _ErrorRow:
    """Distances from the float64 oracle after one step (see ``_low_precision_errors``)."""

    step: int
    name: str
    what: str
    error: float
    ref_error: float
    scale: float
    error_sum: float
    ref_error_sum: float
    numel: int


class _Model(nn.Module):
    """The parameters, registered under their spec names (so ``model.to`` and state_dicts work)."""

    def __init__(self, specs: Sequence[ParamSpec], params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        for spec, param in zip(specs, params):
            self.register_parameter(spec.name, param)


class _Side:
    """One optimizer over its own copy of the parameters, with the gradients it was last given."""

    def __init__(self, label: str, params: Sequence[nn.Parameter], optimizer: Optimizer, specs: Sequence[ParamSpec]):
        self.label = label
        self.params = list(params)
        self.optimizer = optimizer
        self.specs = tuple(specs)
        self.model = _Model(specs, self.params)
        self.given: list[Tensor | None] | None = None
        self.given_values: list[Tensor | None] = []

    def give(self, grads: Sequence[Tensor | None]) -> None:
        """Set every ``.grad`` (a fresh tensor, or None), as a backward pass would."""
        for spec, param, grad in zip(self.specs, self.params, grads):
            if spec.grads == "frozen":
                param.requires_grad_(grad is not None)
            param.grad = grad
        self.remember_grads()

    def remember_grads(self) -> None:
        """Record the current gradients (objects and values), to check that step() leaves them alone."""
        self.given = [param.grad for param in self.params]
        self.given_values = [None if grad is None else grad.detach().clone() for grad in self.given]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()


def _roundtrip(obj: Any) -> Any:
    """Through a checkpoint file: ``torch.save``, then ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _describe(factory: Any) -> str:
    """A readable name for an optimizer class or a ``functools.partial`` of one."""
    if isinstance(factory, functools.partial):
        keywords = ", ".join(f"{key}={value!r}" for key, value in factory.keywords.items())
        return f"{_describe(factory.func)}({keywords})"
    return getattr(factory, "__qualname__", None) or repr(factory)


def _value_id(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, torch.Tensor):
        return f"tensor({value.item() if value.numel() == 1 else '...'})"
    return str(value)


def _dict_id(values: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={_value_id(value)}" for key, value in values.items()) or "defaults"


def _fail(message: str) -> None:
    raise AssertionError(message)


def _mismatch(actual: Tensor, expected: Tensor, *, exact: bool, rtol: float, atol: float = 0.0) -> str | None:
    """None when ``actual`` matches ``expected``, else what differs (sizes, counts, the worst element);
    outside ``exact``, within ``rtol`` times the largest reference element plus ``atol``."""
    for what, got, want in (
        ("shape", tuple(actual.shape), tuple(expected.shape)),
        ("dtype", actual.dtype, expected.dtype),
        ("device", actual.device, expected.device),
    ):
        if got != want:
            return f"{what} {got}, the reference's is {want}"
    if actual.numel() == 0 or (exact and torch.equal(actual, expected)):
        return None
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not exact:
        largest, scale = float((a - e).abs().max()), float(e.abs().max())
        if largest <= rtol * max(scale, torch.finfo(torch.float64).tiny) + atol:  # False for NaN
            return None
    both_nan = a.isnan() & e.isnan()
    diff = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    worst = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
    largest = float(diff.flatten()[worst])
    if exact:
        differing = int((diff != 0).sum())
        if differing == 0:
            return None
        return (
            f"{differing} of {a.numel()} elements differ (expected bit for bit), largest |difference| "
            f"{largest:.3e} at {index}: {float(a.flatten()[worst])!r} vs the reference's {float(e.flatten()[worst])!r}"
        )
    scale = max(float(e.abs().max()), torch.finfo(torch.float64).tiny) if e.isfinite().any() else 1.0
    relative = largest / scale
    if relative <= rtol:
        return None
    return (
        f"relative error {relative:.3e} > rtol {rtol:g} (max |difference| {largest:.3e} at {index}: "
        f"{float(a.flatten()[worst])!r} vs the reference's {float(e.flatten()[worst])!r})"
    )


def _state_value(optimizer: Optimizer, param: Tensor, key: str) -> Any:
    return optimizer.state.get(param, {}).get(key)


# ----- schedulers ---------------------------------------------------------------------
def step_lr(optimizer: Optimizer, total_steps: int) -> Any:
    """``StepLR(step_size=2, gamma=0.5)``."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def one_cycle_lr(optimizer: Optimizer, total_steps: int, cycle_momentum: bool | None = None) -> Any:
    """``OneCycleLR`` up to twice each group's lr over ``total_steps``. ``cycle_momentum=None``:
    on when the optimizer's defaults have ``momentum`` or ``betas`` (OneCycleLR refuses it
    otherwise); pass ``functools.partial(one_cycle_lr, cycle_momentum=False)`` to turn it off."""
    if cycle_momentum is None:
        cycle_momentum = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
    max_lr = [2 * float(group["lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps + 1, cycle_momentum=cycle_momentum
    )


# ----- the suite ----------------------------------------------------------------------
_ZERO_GRAD_MODES = {"set_to_none": True, "zeros": False, "alternating": None}


class OptimizerConformance:
    """Subclass with a ``Test`` name and set the attributes; pytest collects the ``test_*`` methods.

    Required: ``optimizer_cls``, ``reference_cls`` (callables ``(params, **config) -> Optimizer``,
    e.g. a class or a ``functools.partial``) and ``configs`` (a list of hyperparameter dicts, or
    a dict of them by name). The rest have defaults; see the module docstring.
    """

    optimizer_cls: ClassVar[OptimizerFactory]
    """The optimizer under test."""
    reference_cls: ClassVar[OptimizerFactory]
    """The reference, e.g. ``functools.partial(torch.optim.SGD, foreach=False)``."""
    configs: ClassVar[Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]]
    """Hyperparameters, passed as keywords to both (a list, or a dict by name for the test ids)."""
    state_keys: ClassVar[tuple[str, ...]] = ()
    """Per-parameter state compared with the reference's (values, and presence)."""
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float64)
    """The dtypes of ``test_parity``."""
    exact_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    """Dtypes in which the results must be the reference's bit for bit (else within ``rtol``)."""
    rtol: ClassVar[float] = 1e-5
    """Tolerance (max-abs error over the largest reference element) outside ``exact_dtypes``."""
    atol: ClassVar[float] = 0.0
    """Absolute tolerance added to ``rtol``'s, outside ``exact_dtypes``: for a state element that a
    difference in rounding elsewhere (a global norm summed in another order) reaches through a
    cancellation, near zero, where no relative bound holds."""
    dtype: ClassVar[torch.dtype] = torch.float32
    """The dtype of every test but ``test_parity`` and ``test_low_precision``."""
    low_precision_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16)
    """The dtypes of ``test_low_precision`` (empty: skipped)."""
    low_precision_ulps: ClassVar[float] = 1.0
    """Slack of ``test_low_precision`` per parameter: after ``k`` steps, the optimizer's max |error|
    against the float64 oracle may exceed the reference's by ``low_precision_ulps * eps * k`` times
    the largest |oracle value| so far (FusedSGD: at most 0.25 over 30 seeds)."""
    low_precision_mean_slack: ClassVar[float] = 0.05
    """Slack of ``test_low_precision`` over all parameters: the optimizer's mean |error| against the
    float64 oracle may be ``1 + low_precision_mean_slack`` times the reference's."""
    oracle_update: ClassVar[UpdateFn | None] = None
    """A per-parameter update ``(param, grad, state, **config) -> new param`` applied in float64 by
    :func:`~fused_testing.oracle.oracle_step` as ``test_low_precision``'s oracle; None: the
    reference class run in float64."""
    bad_hyperparameters: ClassVar[Sequence[tuple[Mapping[str, Any], ExceptionTypes]]] = ()
    """``(overrides, exception types)``: the first config updated with ``overrides`` must raise."""
    schedulers: ClassVar[Mapping[str, SchedulerFactory]] = {"StepLR": step_lr, "OneCycleLR": one_cycle_lr}
    """``name -> factory(optimizer, total_steps)`` for ``test_lr_scheduler``."""
    zero_grad_set_to_none_default: ClassVar[bool] = True
    """What ``zero_grad()`` without an argument does (torch: True; torch_npu's fused optimizers: False)."""
    other_dtype: ClassVar[torch.dtype | None] = None
    """The dtype ``test_dtype_change`` moves the model to (None: float64, or float32 if ``dtype`` is float64)."""
    second_group: ClassVar[Mapping[str, Any]] = {"lr": 0.01}
    """The overrides of the second param group in ``test_param_groups``."""
    param_specs: ClassVar[Sequence[ParamSpec]] = DEFAULT_PARAMS
    """The parameters of ``test_parity`` and ``test_low_precision``."""
    light_param_specs: ClassVar[Sequence[ParamSpec]] = LIGHT_PARAMS
    """The parameters of the other tests."""
    steps: ClassVar[int] = 5
    """Steps per run (state_dict and copy tests: this many before and after)."""
    device: ClassVar[str] = "cpu"
    """Where the parameters live."""
    seed: ClassVar[int | None] = None
    """A fixed seed instead of a fresh one per test (``$FUSED_TESTING_SEED`` overrides both)."""
    expected_failures: ClassVar[Mapping[str, str]] = {}
    """``"test_name"`` or ``"test_name[id]"`` -> reason: marked ``xfail(strict=True)``."""

    # ----- collection ---------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: Any) -> None:
        """Parametrise each test method over the axes it takes (config, dtype, ...), with ids."""
        import pytest

        cls = metafunc.cls
        if cls is None or not issubclass(cls, OptimizerConformance):
            return
        cls.validate()
        names = [name for name in inspect.signature(metafunc.function).parameters if name in _AXES]
        if not names:  # a test method of a subclass that takes none of the axes
            return
        axes = [_AXES[name](cls) for name in names]
        params = []
        for combination in itertools.product(*axes):
            ident = "-".join(label for label, _ in combination)
            reason = cls.expected_failures.get(f"{metafunc.function.__name__}[{ident}]")
            reason = reason or cls.expected_failures.get(metafunc.function.__name__)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason is not None else []
            params.append(pytest.param(*(value for _, value in combination), id=ident, marks=marks))
        metafunc.parametrize(names, params)

    @classmethod
    def validate(cls) -> None:
        """Raise TypeError for a subclass that misses a required attribute or declares an expected
        failure that names no test (collection calls this)."""
        missing = [name for name in ("optimizer_cls", "reference_cls", "configs") if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"{cls.__name__} must set {', '.join(missing)} (see fused_testing.conformance)")
        if not cls.named_configs():
            raise TypeError(f"{cls.__name__}.configs is empty")
        known = set(cls.conformance_ids())
        known |= {name.partition("[")[0] for name in known}
        unknown = sorted(key for key in cls.expected_failures if key not in known)
        if unknown:
            raise TypeError(f"{cls.__name__}.expected_failures names no test: {', '.join(unknown)}")
        if not cls.bad_hyperparameters:  # else test_bad_hyperparameters would be skipped, counted as passing
            raise TypeError(
                f"{cls.__name__}.bad_hyperparameters is empty: give at least one (overrides, exception) case "
                "its constructor must reject"
            )

    @classmethod
    def conformance_ids(cls) -> list[str]:
        """Every test this class runs, as ``name[id]`` (the keys ``expected_failures`` takes)."""
        ids = []
        for name in dir(cls):
            function = getattr(cls, name)
            if not name.startswith("test") or not callable(function):
                continue
            axes = [_AXES[arg](cls) for arg in inspect.signature(function).parameters if arg in _AXES]
            if not axes:
                ids.append(name)
            for combination in itertools.product(*axes):
                ids.append(f"{name}[{'-'.join(label for label, _ in combination)}]")
        return ids

    @classmethod
    def named_configs(cls) -> list[tuple[str, dict[str, Any]]]:
        """``(id, config)`` for every config."""
        if isinstance(cls.configs, Mapping):
            return [(str(name), dict(config)) for name, config in cls.configs.items()]
        return [(_dict_id(config), dict(config)) for config in cls.configs]

    # ----- helpers ------------------------------------------------------------------
    def _config_name(self, config: Mapping[str, Any]) -> str:
        for name, known in type(self).named_configs():
            if known.keys() == config.keys() and all(known[key] is config[key] for key in known):
                return name
        for name, known in type(self).named_configs():
            try:
                if known == dict(config):
                    return name
            except RuntimeError:  # tensors that do not compare to one bool
                continue
        return _dict_id(config)

    def _case(self, *, light: bool = True) -> _Case:
        cls = type(self)
        specs = cls.light_param_specs if light else cls.param_specs
        return _Case(specs, torch.device(cls.device), draw_seed(cls.seed))

    def _context(self, case: _Case, config: Mapping[str, Any]) -> str:
        cls = type(self)
        return (
            f"[{_describe(cls.optimizer_cls)} vs {_describe(cls.reference_cls)}, config "
            f"{self._config_name(config)} = {dict(config)}, seed={case.seed}: rerun with {SEED_ENV}={case.seed}]"
        )

    def _side(
        self,
        label: str,
        factory: OptimizerFactory,
        case: _Case,
        config: Mapping[str, Any],
        dtype: torch.dtype,
        values: Sequence[Tensor] | None = None,
    ) -> _Side:
        """An optimizer built by ``factory`` over fresh parameters: the case's initial values, or copies
        of ``values`` (strides kept)."""
        if values is None:
            params = case.params(dtype)
        else:
            params = [nn.Parameter(value.detach().clone()) for value in values]
        return _Side(label, params, factory(params, **config), case.specs)

    def _pair(self, case: _Case, config: Mapping[str, Any], dtype: torch.dtype) -> tuple[_Side, _Side]:
        cls = type(self)
        return (
            self._side("optimizer", cls.optimizer_cls, case, config, dtype),
            self._side("reference", cls.reference_cls, case, config, dtype),
        )

    def _step(self, case: _Case, step: int, *sides: _Side) -> None:
        for side in sides:
            side.give(case.grads(step, side.params[0].dtype))
            side.step()

    def _second_half(
        self,
        case: _Case,
        stepped: Sequence[_Side],
        compared: Sequence[_Side],
        reference: _Side,
        *,
        after: str,
        exact: bool,
        context: str,
    ) -> None:
        """Steps ``steps`` to ``2 * steps`` of every side of ``stepped`` (in that order), each side of
        ``compared`` checked against ``reference`` after every step: the second half of a test that
        loaded, resumed or copied an optimizer ``after`` the first."""
        steps = type(self).steps
        for step in range(steps, 2 * steps):
            self._step(case, step, *stepped)
            when = f"step {step + 1}, {step - steps + 1} after {after}"
            for side in compared:
                self._assert_match(side, reference, exact=exact, when=when, context=context)

    def _exact(self, dtype: torch.dtype) -> bool:
        return dtype in type(self).exact_dtypes

    def _assert_match(self, actual: _Side, expected: _Side, *, exact: bool, when: str, context: str) -> None:
        """Parameters, gradients and ``state_keys`` of ``actual`` are ``expected``'s."""
        cls = type(self)
        for spec, param, ref in zip(actual.specs, actual.params, expected.params):  # the state's kind first
            for key in cls.state_keys:
                mine = _state_value(actual.optimizer, param, key)
                theirs = _state_value(expected.optimizer, ref, key)
                if isinstance(mine, Tensor) and isinstance(theirs, Tensor) and mine.dtype != theirs.dtype:
                    _fail(
                        f"{actual.label}: parameter {spec.name!r} {tuple(spec.shape)} ({param.dtype}), {when}: state "
                        f"{key!r} is {mine.dtype}, the reference's is {theirs.dtype} {context}"
                    )
        for index, (spec, param, ref) in enumerate(zip(actual.specs, actual.params, expected.params)):
            where = f"{actual.label}: parameter {spec.name!r} {tuple(spec.shape)}, {when}"
            problem = _mismatch(param, ref, exact=exact, rtol=cls.rtol, atol=cls.atol)
            if problem is not None:
                _fail(f"{where}: {problem} {context}")
            if param.numel() > 1 and param.stride() != ref.stride():
                _fail(f"{where}: strides {param.stride()}, the reference's are {ref.stride()} {context}")
            if actual.given is not None and index < len(actual.given):
                self._assert_grad_untouched(actual, index, where, context)
            for key in cls.state_keys:
                mine = _state_value(actual.optimizer, param, key)
                theirs = _state_value(expected.optimizer, ref, key)
                if (mine is None) != (theirs is None):
                    has = "has no" if mine is None else "has a"
                    reference_has = "has one" if mine is None else "has none"
                    _fail(f"{where}: {has} state {key!r}; the reference {reference_has} {context}")
                if isinstance(theirs, Tensor) and isinstance(mine, Tensor):
                    problem = _mismatch(mine, theirs, exact=exact, rtol=cls.rtol, atol=cls.atol)
                    if problem is not None:
                        _fail(f"{where}: state {key!r}: {problem} {context}")
                elif theirs is not None and mine != theirs:
                    _fail(f"{where}: state {key!r} is {mine!r}, the reference's {theirs!r} {context}")

    @staticmethod
    def _assert_grad_untouched(side: _Side, index: int, where: str, context: str) -> None:
        assert side.given is not None
        given, value = side.given[index], side.given_values[index]
        grad = side.params[index].grad
        if grad is not given:
            _fail(f"{where}: step() replaced the .grad it was given (torch.optim never does) {context}")
        if grad is not None and value is not None and not torch.equal(grad, value):
            _fail(f"{where}: step() modified the gradient it was given (torch.optim never does) {context}")

    def _assert_same_state_dict(
        self, actual: Mapping[str, Any], expected: Mapping[str, Any], *, exact: bool, what: str, context: str
    ) -> None:
        """The same format: state entries and keys, param-group keys and values; ``state_keys`` values equal."""
        cls = type(self)
        if set(actual) != set(expected):
            _fail(f"{what}: top-level keys {sorted(actual)}, the reference's {sorted(expected)} {context}")
        mine, theirs = actual["state"], expected["state"]
        if sorted(mine) != sorted(theirs):
            _fail(f"{what}: state entries for params {sorted(mine)}, the reference's {sorted(theirs)} {context}")
        for key in theirs:
            for name in cls.state_keys:
                a, e = mine[key].get(name), theirs[key].get(name)
                if (a is None) != (e is None):
                    _fail(f"{what}: param {key} state {name!r} is {a!r}, the reference's {e!r} {context}")
                if isinstance(a, Tensor) and isinstance(e, Tensor):
                    problem = _mismatch(a, e, exact=exact, rtol=cls.rtol, atol=cls.atol)
                    if problem is not None:
                        _fail(f"{what}: param {key} state {name!r}: {problem} {context}")
        groups, ref_groups = actual["param_groups"], expected["param_groups"]
        if len(groups) != len(ref_groups):
            _fail(f"{what}: {len(groups)} param groups, the reference has {len(ref_groups)} {context}")
        for index, (group, ref_group) in enumerate(zip(groups, ref_groups)):
            if set(group) != set(ref_group):
                _fail(
                    f"{what}: param group {index} has keys {sorted(group)}, the reference's "
                    f"{sorted(ref_group)} {context}"
                )
            for key, value in ref_group.items():
                if key in ("foreach", "fused", "differentiable"):  # implementation choices
                    continue
                if group[key] != value:
                    _fail(f"{what}: param group {index} {key}={group[key]!r}, the reference's {value!r} {context}")

    # ----- the tests ----------------------------------------------------------------
    def test_parity(self, config: Mapping[str, Any], dtype: torch.dtype) -> None:
        """Every step over every parameter kind, in each of ``dtypes``; bit for bit in ``exact_dtypes``."""
        case = self._case(light=False)
        context = self._context(case, config)
        fused, ref = self._pair(case, config, dtype)
        exact = self._exact(dtype)
        for side in (fused, ref):
            side.remember_grads()
            side.step()
        self._assert_match(fused, ref, exact=exact, when="after a step() without any gradient", context=context)
        for step in range(type(self).steps):
            self._step(case, step, fused, ref)
            self._assert_match(fused, ref, exact=exact, when=f"step {step + 1} ({dtype})", context=context)

    def test_low_precision(self, config: Mapping[str, Any], low_precision_dtype: torch.dtype) -> None:
        """No worse than the reference in the same dtype, both measured against a float64 oracle."""
        cls = type(self)
        case = self._case(light=False)
        context = self._context(case, config)
        eps = torch.finfo(low_precision_dtype).eps
        for row in self._low_precision_errors(case, config, low_precision_dtype, context):
            if math.isfinite(row.ref_error_sum) and row.ref_error > 0.5 * row.scale:
                # The reference kept no correct digit in this dtype (its error half the largest value):
                # its error is no bound; ours must stay finite.
                if not math.isfinite(row.error_sum):
                    _fail(
                        f"{row.what} of parameter {row.name!r}, step {row.step} ({low_precision_dtype}): not "
                        f"finite where the reference's is {context}"
                    )
            elif not math.isfinite(row.ref_error_sum):  # the reference itself broke down in this dtype
                # (torch's Adam in fp16: eps=1e-8 rounds to 0, 0/0): be finite and within the values' scale
                if not (math.isfinite(row.error_sum) and (row.name == "*" or row.error <= row.scale)):
                    _fail(
                        f"{row.what} of parameter {row.name!r}, step {row.step} ({low_precision_dtype}): max |error| "
                        f"against the float64 oracle {row.error:.3e} where the reference's is not finite {context}"
                    )
            elif row.name != "*":
                bound = row.ref_error + cls.low_precision_ulps * eps * row.scale * row.step
                if not row.error <= bound:
                    _fail(
                        f"{row.what} of parameter {row.name!r}, step {row.step} ({low_precision_dtype}): max |error| "
                        f"against the float64 oracle {row.error:.3e}, the reference's {row.ref_error:.3e}; allowed "
                        f"{bound:.3e} (the reference's + low_precision_ulps={cls.low_precision_ulps} * eps * "
                        f"{row.scale:.3e} (the largest |value| so far) * steps) {context}"
                    )
            elif not row.error_sum <= (1 + cls.low_precision_mean_slack) * row.ref_error_sum:
                _fail(
                    f"{row.what} of all parameters, step {row.step} ({low_precision_dtype}): mean |error| against the "
                    f"float64 oracle {row.error_sum / row.numel:.3e}, the reference's "
                    f"{row.ref_error_sum / row.numel:.3e} "
                    f"(allowed: {1 + cls.low_precision_mean_slack:g} times) {context}"
                )

    def _low_precision_errors(
        self, case: _Case, config: Mapping[str, Any], dtype: torch.dtype, context: str
    ) -> list[_ErrorRow]:
        """Step the optimizer and the reference in ``dtype`` and the float64 oracle, all with the same
        gradients; every step, the distance of each from the oracle, per parameter (max |error|, with
        the largest oracle magnitude so far) and over all parameters (summed |error|, in the rows with
        name ``"*"``), for the values and every ``state_keys`` entry."""
        cls = type(self)
        fused, ref = self._pair(case, config, dtype)
        oracle: Float64Oracle | UpdateOracle
        if cls.oracle_update is not None:
            oracle = UpdateOracle(cls.oracle_update, ref.params, **config)
        else:
            oracle = Float64Oracle(cls.reference_cls, ref.params, **config)
        scales: dict[tuple[int, str], float] = {}
        for index, param in enumerate(ref.params):
            scales[index, "value"] = float(param.detach().abs().max()) if param.numel() else 0.0
        rows = []
        for step in range(1, cls.steps + 1):
            self._step(case, step - 1, fused, ref)
            oracle.step(fused.given or [])
            totals: dict[str, list[float]] = {}
            for index, spec in enumerate(case.specs):
                where = f"parameter {spec.name!r} {tuple(spec.shape)}, step {step} ({dtype})"
                param, ref_param = fused.params[index], ref.params[index]
                if param.dtype != dtype:
                    _fail(f"{where}: the optimizer changed its dtype to {param.dtype} {context}")
                self._assert_grad_untouched(fused, index, where, context)
                triples: list[tuple[str, Tensor, Tensor, Tensor]] = [("value", param, ref_param, oracle.params[index])]
                for key in cls.state_keys:
                    mine = _state_value(fused.optimizer, param, key)
                    theirs = _state_value(ref.optimizer, ref_param, key)
                    if (mine is None) != (theirs is None):
                        _fail(f"{where}: state {key!r} is {mine!r}, the reference's {theirs!r} {context}")
                    exact = oracle.state(index).get(key)
                    if isinstance(mine, Tensor) and isinstance(theirs, Tensor) and isinstance(exact, Tensor):
                        if mine.is_floating_point():
                            triples.append((f"state {key!r}", mine, theirs, exact))
                for what, mine, theirs, exact in triples:
                    if exact.numel() == 0:
                        continue
                    target = exact.detach().to(torch.float64)
                    errors = (mine.detach().to(torch.float64) - target).abs()
                    ref_errors = (theirs.detach().to(torch.float64) - target).abs()
                    scale = max(scales.get((index, what), 0.0), float(target.abs().max()))
                    scales[index, what] = scale
                    row = _ErrorRow(
                        step,
                        spec.name,
                        what,
                        float(errors.max()),
                        float(ref_errors.max()),
                        scale,
                        float(errors.sum()),
                        float(ref_errors.sum()),
                        errors.numel(),
                    )
                    rows.append(row)
                    total = totals.setdefault(what, [0.0, 0.0, 0])
                    total[0] += row.error_sum
                    total[1] += row.ref_error_sum
                    total[2] += row.numel
            for what, (error_sum, ref_error_sum, numel) in totals.items():
                rows.append(_ErrorRow(step, "*", what, 0.0, 0.0, 0.0, error_sum, ref_error_sum, int(numel)))
        return rows

    def test_state_dict_to_reference(self, config: Mapping[str, Any]) -> None:
        """The optimizer's checkpoint has the reference's format and resumes in the reference."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, truth = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        for step in range(cls.steps):
            self._step(case, step, fused, truth)
        saved = _roundtrip(fused.optimizer.state_dict())
        self._assert_same_state_dict(
            saved, truth.optimizer.state_dict(), exact=exact, what="the optimizer's state_dict", context=context
        )
        resumed = self._side(
            "reference loaded from the optimizer", cls.reference_cls, case, config, cls.dtype, fused.params
        )
        resumed.optimizer.load_state_dict(saved)
        self._second_half(
            case, (resumed, truth, fused), (resumed, fused), truth, after="loading", exact=exact, context=context
        )

    def test_state_dict_from_reference(self, config: Mapping[str, Any]) -> None:
        """The reference's checkpoint loads into the optimizer, which resumes as the reference."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        truth = self._side("reference", cls.reference_cls, case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        for step in range(cls.steps):
            self._step(case, step, truth)
        saved = _roundtrip(truth.optimizer.state_dict())
        resumed = self._side(
            "optimizer loaded from the reference", cls.optimizer_cls, case, config, cls.dtype, truth.params
        )
        resumed.optimizer.load_state_dict(saved)
        self._assert_same_state_dict(
            resumed.optimizer.state_dict(),
            saved,
            exact=True,
            what="state_dict() after load_state_dict",
            context=context,
        )
        self._second_half(case, (resumed, truth), (resumed,), truth, after="loading", exact=exact, context=context)

    def test_checkpoint_resume(self, config: Mapping[str, Any]) -> None:
        """Model and optimizer checkpoint (torch.save / torch.load(weights_only=True)) into new ones."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, truth = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        for step in range(cls.steps):
            self._step(case, step, fused, truth)
        checkpoint = _roundtrip({"model": fused.model.state_dict(), "optimizer": fused.optimizer.state_dict()})
        resumed = self._side("resumed optimizer", cls.optimizer_cls, case, config, cls.dtype)
        resumed.model.load_state_dict(checkpoint["model"])
        resumed.optimizer.load_state_dict(checkpoint["optimizer"])
        self._second_half(case, (resumed, truth), (resumed,), truth, after="resuming", exact=exact, context=context)

    def test_reallocation(self, config: Mapping[str, Any]) -> None:
        """``p.data = p.data.clone()`` and a ``model.to(dtype)`` round trip between steps."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        other = torch.float32 if cls.dtype == torch.float64 else torch.float64
        for step in range(cls.steps):
            if step == 2:
                for side in (fused, ref):
                    for param in side.params[:: max(1, len(side.params) // 4)]:
                        param.data = param.data.clone()
                what = "after p.data = p.data.clone()"
            elif step == 3:
                for side in (fused, ref):
                    side.model.to(other)
                    side.model.to(cls.dtype)
                what = f"after model.to({other}).to({cls.dtype})"
            else:
                what = ""
            self._step(case, step, fused, ref)
            self._assert_match(fused, ref, exact=exact, when=f"step {step + 1} {what}".rstrip(), context=context)

    def test_dtype_change(self, config: Mapping[str, Any]) -> None:
        """Steps after ``model.to(other_dtype)`` (the state created before stays as the reference keeps
        it: torch.optim does not convert state), then after ``model.to(dtype)`` again."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        other = cls.other_dtype or (torch.float32 if cls.dtype == torch.float64 else torch.float64)
        exact = self._exact(cls.dtype) and self._exact(other)
        for step in range(cls.steps):
            if step in (2, cls.steps - 1):
                for side in (fused, ref):
                    side.model.to(other if step == 2 else cls.dtype)
            dtype = fused.params[0].dtype
            self._step(case, step, fused, ref)
            self._assert_match(fused, ref, exact=exact, when=f"step {step + 1}, parameters in {dtype}", context=context)

    def test_lr_scheduler(self, config: Mapping[str, Any], scheduler: str) -> None:
        """The hyperparameters a scheduler assigns are used at the next step."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        factory = cls.schedulers[scheduler]
        schedulers = [factory(side.optimizer, cls.steps) for side in (fused, ref)]
        for step in range(cls.steps):
            self._step(case, step, fused, ref)
            for each in schedulers:
                each.step()
            when = f"step {step + 1} with {scheduler}"
            self._assert_match(fused, ref, exact=exact, when=when, context=context)
            for index, (group, ref_group) in enumerate(zip(fused.optimizer.param_groups, ref.optimizer.param_groups)):
                for key in ("lr", "momentum", "betas"):
                    if key in ref_group and group.get(key) != ref_group[key]:
                        _fail(
                            f"{when}: param group {index} {key}={group.get(key)!r}, "
                            f"the reference's {ref_group[key]!r} {context}"
                        )

    def test_zero_grad(self, config: Mapping[str, Any], zero_grad_mode: str) -> None:
        """Real backward passes (two accumulated per step) with ``zero_grad(set_to_none=...)`` between steps."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        for step in range(cls.steps):
            for side in (fused, ref):
                for _ in range(2):
                    case.loss(side.params, step).backward()
                side.remember_grads()
                side.step()
            self._assert_match(fused, ref, exact=exact, when=f"step {step + 1}", context=context)
            set_to_none = _ZERO_GRAD_MODES[zero_grad_mode]
            if set_to_none is None:
                set_to_none = step % 2 == 0
            before = {side.label: [param.grad for param in side.params] for side in (fused, ref)}
            for side in (fused, ref):
                side.optimizer.zero_grad(set_to_none=set_to_none)
                side.given = None
            when = f"zero_grad(set_to_none={set_to_none}) after step {step + 1}"
            self._assert_zeroed(fused, ref, before, when, context)

    def _assert_zeroed(
        self, fused: _Side, ref: _Side, before: Mapping[str, list[Tensor | None]], when: str, context: str
    ) -> None:
        for index, spec in enumerate(fused.specs):
            grad, ref_grad = fused.params[index].grad, ref.params[index].grad
            where = f"parameter {spec.name!r}, {when}"
            if (grad is None) != (ref_grad is None):
                _fail(f"{where}: .grad is {'None' if grad is None else 'a tensor'}, the reference's is not {context}")
            if grad is None or ref_grad is None:
                continue
            if not torch.equal(grad, ref_grad):
                _fail(f"{where}: .grad holds {grad.abs().max().item()!r} (max |x|), not zeros {context}")
            kept = grad is before[fused.label][index]
            ref_kept = ref_grad is before[ref.label][index]
            if kept != ref_kept:
                _fail(
                    f"{where}: .grad {'is' if kept else 'is not'} the same tensor object as before; the reference's "
                    f"{'is' if ref_kept else 'is not'} {context}"
                )

    def test_zero_grad_default(self, config: Mapping[str, Any]) -> None:
        """``zero_grad()`` without an argument: None, or zeros kept in place, per ``zero_grad_set_to_none_default``."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        for side in (fused, ref):
            case.loss(side.params, 0).backward()
            side.remember_grads()
            side.step()
        self._assert_match(fused, ref, exact=self._exact(cls.dtype), when="step 1", context=context)
        before = {side.label: [param.grad for param in side.params] for side in (fused, ref)}
        fused.optimizer.zero_grad()
        ref.optimizer.zero_grad(set_to_none=cls.zero_grad_set_to_none_default)
        self._assert_zeroed(
            fused, ref, before, f"zero_grad() (set_to_none={cls.zero_grad_set_to_none_default} expected)", context
        )

    def test_bad_hyperparameters(self, bad_case: tuple[Mapping[str, Any], ExceptionTypes]) -> None:
        """The constructor rejects each ``bad_hyperparameters`` entry with one of its exception types."""
        cls = type(self)
        overrides, expected = bad_case
        config = {**cls.named_configs()[0][1], **overrides}
        params = [nn.Parameter(torch.randn(8, 4, device=cls.device, dtype=cls.dtype))]
        names = expected.__name__ if isinstance(expected, type) else " or ".join(e.__name__ for e in expected)
        try:
            cls.optimizer_cls(params, **config)
        except expected:
            return
        except Exception as error:
            _fail(
                f"{_describe(cls.optimizer_cls)}(**{config}) raised {type(error).__name__}: {error}; expected {names}"
            )
        _fail(f"{_describe(cls.optimizer_cls)}(**{config}) was accepted; expected {names}")

    def test_copy(self, config: Mapping[str, Any], copy_with: str) -> None:
        """An optimizer with state, pickled or deep-copied, goes on as the reference, as does the original."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        for step in range(cls.steps):
            self._step(case, step, fused, ref)
        if copy_with == "pickle":
            copied: Optimizer = pickle.loads(pickle.dumps(fused.optimizer))
        else:
            copied = copy.deepcopy(fused.optimizer)
        params = [param for group in copied.param_groups for param in group["params"]]
        copy_side = _Side(f"{copy_with} copy", params, copied, case.specs)
        self._assert_match(copy_side, fused, exact=True, when=f"right after {copy_with}", context=context)
        after = f"the {copy_with}"
        self._second_half(
            case, (copy_side, fused, ref), (copy_side, fused), ref, after=after, exact=exact, context=context
        )

    def test_closure(self, config: Mapping[str, Any]) -> None:
        """``step(closure)`` runs the closure with gradients enabled and returns its loss."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        fused, ref = self._pair(case, config, cls.dtype)
        exact = self._exact(cls.dtype)
        for step in range(cls.steps):
            losses = []
            for side in (fused, ref):

                def closure(side: _Side = side, step: int = step) -> Tensor:
                    side.optimizer.zero_grad(set_to_none=True)
                    loss = case.loss(side.params, step)
                    loss.backward()
                    side.remember_grads()
                    return loss

                losses.append(side.step(closure))
            same_loss = isinstance(losses[0], Tensor) and not _mismatch(
                losses[0], losses[1], exact=exact, rtol=cls.rtol, atol=cls.atol
            )
            if not same_loss:
                _fail(f"step {step + 1}: step(closure) returned {losses[0]!r}, the reference {losses[1]!r} {context}")
            self._assert_match(fused, ref, exact=exact, when=f"step {step + 1} with a closure", context=context)

    def test_param_groups(self, config: Mapping[str, Any]) -> None:
        """Two param groups, the second with ``second_group``'s overrides."""
        cls = type(self)
        case = self._case()
        context = self._context(case, config)
        exact = self._exact(cls.dtype)
        sides = []
        for label, factory in (("optimizer", cls.optimizer_cls), ("reference", cls.reference_cls)):
            params = case.params(cls.dtype)
            half = len(params) // 2
            groups = [{"params": params[:half]}, {"params": params[half:], **cls.second_group}]
            sides.append(_Side(label, params, factory(groups, **config), case.specs))
        fused, ref = sides
        for step in range(cls.steps):
            self._step(case, step, fused, ref)
            self._assert_match(fused, ref, exact=exact, when=f"step {step + 1} (two param groups)", context=context)


def _dtype_axis(dtypes: Iterable[torch.dtype]) -> list[tuple[str, Any]]:
    return [(str(dtype).removeprefix("torch."), dtype) for dtype in dtypes]


_AXES: dict[str, Callable[[type[OptimizerConformance]], list[tuple[str, Any]]]] = {
    "config": lambda cls: cls.named_configs(),
    "dtype": lambda cls: _dtype_axis(cls.dtypes),
    "low_precision_dtype": lambda cls: _dtype_axis(cls.low_precision_dtypes),
    "scheduler": lambda cls: [(name, name) for name in cls.schedulers],
    "zero_grad_mode": lambda cls: [(mode, mode) for mode in _ZERO_GRAD_MODES],
    "copy_with": lambda cls: [("pickle", "pickle"), ("deepcopy", "deepcopy")],
    "bad_case": lambda cls: [
        (_dict_id(overrides), (overrides, errors)) for overrides, errors in cls.bad_hyperparameters
    ],
}
"""The parametrised arguments of the test methods, and their ``(id, value)`` lists per class."""
