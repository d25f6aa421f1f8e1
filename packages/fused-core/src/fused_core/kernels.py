"""Kernel launch registry: (kernel name, device type, dtype) -> launcher.

A *launcher* applies one optimizer update to flat, 1-D, contiguous slices::

    launcher(params, grads, state, hyperparams, run) -> None

``params`` and ``grads`` are slices of a bucket's flat buffers covering one *run* of slots
(parameters of one param group, all with a gradient, whose state is in the same condition);
``state`` maps each state name the group uses to its slice: a state buffer's slice is laid out
like ``params``, a scalar state's (Adam's ``step``) holds one value per slot of the run, the same
for every slot (the core splits runs where they differ). ``hyperparams`` is the param group dict
(read every step, so schedulers are honoured) and ``run`` (:class:`RunInfo`) says which
parameters the run covers, where each lies in the slices, and whether the run's state is
initialised (``run.first_step``: not yet; initialise it from this step, do not read it).

A *segment launcher*, registered under :func:`segments_kernel` of the kernel's name,
reads every parameter's gradient where it lies instead (autograd's fresh gradient
tensors, in torch's default loop), so that nothing is copied first::

    launcher(params, state, grads: GradSegments, hyperparams) -> int

``params`` and ``state`` cover one param group's slots of a bucket (a scalar state: one value per
slot, which may differ between slots); ``grads`` says where each slot is and where its gradient
lies, which slots have one, and which have initialised state (the launcher marks the slots it
initialises with 2 and returns how many). The core uses one where registered for (device, dtype),
and otherwise copies the gradients into the flat gradient buffer and calls the launcher.

Resolution order for a tensor on ``device`` with ``dtype`` (first match wins;
within one level the most recent registration wins):

1. registered for ``device.type`` and a dtype set containing ``dtype``
   (or a predicate that accepts ``(device, dtype)``);
2. registered for ``device.type`` with ``dtypes=None`` (any dtype);
3. registered for ``"*"`` (any device) and a matching dtype set or predicate;
4. registered for ``"*"`` with ``dtypes=None``.

Predicates let a plugin verify a candidate (a native fused op, say) on the
torch version and device at hand before routing a dtype to it. They are
called at most once per (kernel, device, dtype).

Where a launcher serves (kernel, device, dtype) because one preferred to it declined (its
dtype predicate or set said no), resolution logs it once at DEBUG under ``fused_core.kernels``,
naming both; :meth:`KernelRegistry.explain` says why for every registered launcher. Resolution
happens once per (kernel, device, dtype) while building a layout, never per step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .backends import KNOWN_DEVICE_TYPES
from .errors import PluginError

logger = logging.getLogger(__name__)

ANY_DEVICE = "*"


@dataclass(frozen=True)
class RunInfo:
    """What one flat launch covers: the metadata a launcher gets beside its slices."""

    first_step: bool
    """True when the run's state is not initialised yet: initialise it from this step, do not read it."""
    parameters: tuple[torch.Tensor, ...]
    """The parameters of the run's slots, in order (each is its own tensor, bound to its slot)."""
    offsets: torch.Tensor
    """int64 element offset of each slot from the start of the run's slices."""
    numels: torch.Tensor
    """int64 element count of each slot (alignment gaps, if any, lie between slots)."""

    @property
    def slots(self) -> int:
        return len(self.parameters)

    @classmethod
    def whole(cls, params: torch.Tensor, *, first_step: bool) -> RunInfo:
        """One slot covering a whole slice: a run over ``params`` itself (probes, tests, benchmarks)."""
        return cls(
            first_step=first_step,
            parameters=(params,),
            offsets=torch.zeros(1, dtype=torch.int64),
            numels=torch.tensor([params.numel()], dtype=torch.int64),
        )


class Launcher(Protocol):
    def __call__(
        self,
        params: torch.Tensor,
        grads: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        hyperparams: Mapping[str, Any],
        run: RunInfo,
        /,
    ) -> None: ...


SEGMENTS_SUFFIX = "[segments]"


def segments_kernel(kernel: str) -> str:
    """The registry name of ``kernel``'s segment launchers: ``"sgd"`` -> ``"sgd[segments]"``."""
    return kernel + SEGMENTS_SUFFIX


@dataclass(frozen=True)
class GradSegments:
    """Where the gradients of one run of slots lie (CPU addresses), for a segment launcher.

    Slot ``i`` occupies elements ``offsets[i] : offsets[i] + numels[i]`` of the run's ``params``
    and state slices; if ``has_grad[i]``, its gradient is the dense array at address ``ptrs[i]``,
    with the parameter's dtype and memory order.
    """

    ptrs: torch.Tensor
    """int64 addresses of the gradients (0 where none)."""
    has_grad: torch.Tensor
    """int8, 1 where the slot has a gradient this step."""
    offsets: torch.Tensor
    """int64 element offsets of the slots from the start of the run."""
    numels: torch.Tensor
    """int64 element counts of the slots."""
    initialized: torch.Tensor
    """uint8, 1 where the slot's state is initialised; a launcher sets 2 where it initialises it."""

    @property
    def slots(self) -> int:
        return self.offsets.numel()

    @classmethod
    def whole(cls, grads: torch.Tensor, *, initialized: bool) -> GradSegments:
        """One slot covering a whole contiguous gradient slice (a flat launcher's view of its run)."""
        return cls(
            ptrs=torch.tensor([grads.data_ptr()], dtype=torch.int64),
            has_grad=torch.ones(1, dtype=torch.int8),
            offsets=torch.zeros(1, dtype=torch.int64),
            numels=torch.tensor([grads.numel()], dtype=torch.int64),
            initialized=torch.tensor([int(initialized)], dtype=torch.uint8),
        )

    def c_arguments(self) -> tuple[int, ...]:
        """The slot table as a C segment kernel takes it, after its buffers and before its scalars
        (``fused_core/csrc/fused_segments.h``)::

            const int64_t *grad_ptrs, const int8_t *has_grad, const int64_t *offsets,
            const int64_t *numels, uint8_t *initialized, int64_t slots
        """
        return (
            self.ptrs.data_ptr(),
            self.has_grad.data_ptr(),
            self.offsets.data_ptr(),
            self.numels.data_ptr(),
            self.initialized.data_ptr(),
            self.slots,
        )

    def count_steps_(self, steps: torch.Tensor) -> torch.Tensor:
        """Count this step into a per-slot step table (a scalar state such as Adam's ``step``, one value
        per slot): restart at 0 where a slot's state starts now (a gradient, not initialised), then add 1
        where a slot has a gradient. Returns ``steps``, counted in place."""
        starting = (self.initialized == 0) & (self.has_grad != 0)
        return steps.masked_fill_(starting, 0).add_(self.has_grad)


class SegmentLauncher(Protocol):
    def __call__(
        self,
        params: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        grads: GradSegments,
        hyperparams: Mapping[str, Any],
        /,
    ) -> int: ...


DTYPE_SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""The suffix of a C kernel's function for each dtype it serves, by convention: ``sgd_segments_f32``."""


def dtype_symbols(prefix: str, dtypes: Iterable[torch.dtype] = tuple(DTYPE_SUFFIXES)) -> dict[torch.dtype, str]:
    """The exported function of each dtype of a kernel, by the naming convention:
    ``dtype_symbols("adam_segments")[torch.float32] == "adam_segments_f32"``."""
    return {dtype: f"{prefix}_{DTYPE_SUFFIXES[dtype]}" for dtype in dtypes}


LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})
FP32_CHUNK = 1 << 19
"""Elements per fp32 chunk in :func:`in_fp32_chunks`: a few such chunks stay in a core's cache."""


def as_float(value: Any) -> float:
    """A hyperparameter that may be a one-element tensor (``lr``), as a Python float."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def as_scalar(value: Any) -> Any:
    """A hyperparameter as torch.optim's step computes with it (``torch.optim.optimizer._to_scalar``):
    a one-element tensor becomes a 0-dim tensor, so that arithmetic on it (Adam's ``lr / bias_correction1``,
    AdamW's ``1 - lr * weight_decay``) happens in the tensor's dtype, as in torch; anything else is
    returned as it is."""
    return value.reshape(()) if isinstance(value, torch.Tensor) else value


def in_fp32_chunks(
    update: Callable[..., None],
    params: torch.Tensor,
    grads: torch.Tensor,
    *state: torch.Tensor | None,
    chunk: int = FP32_CHUNK,
) -> None:
    """Run ``update(params, grads, *state)`` so that fp16/bf16 slices are computed in fp32.

    Low-precision slices are processed ``chunk`` elements at a time: fp32 copies are
    updated in place and ``params`` and ``state`` are rounded back once (``grads`` are
    only read; ``None`` state entries pass through). Other dtypes are updated directly.
    A plugin's launcher wraps its update in this to get one rounding per step.
    """
    if params.dtype not in LOW_PRECISION:
        update(params, grads, *state)
        return
    numel = params.numel()
    # fp32 scratch allocated once per call: a fresh allocation per chunk costs page faults
    # (large CPU allocations are mmap-ed), 2.5x the whole update on a 2-core CPU.
    size = min(chunk, numel)
    param32, grad32, *state32 = (params.new_empty(size, dtype=torch.float32) for _ in range(2 + len(state)))
    for start in range(0, numel, chunk):
        part, count = slice(start, start + chunk), min(chunk, numel - start)
        pieces = [None if t is None else scratch[:count].copy_(t[part]) for t, scratch in zip(state, state32)]
        update(param32[:count].copy_(params[part]), grad32[:count].copy_(grads[part]), *pieces)
        params[part].copy_(param32[:count])
        for t, piece in zip(state, pieces):
            if t is not None and piece is not None:
                t[part].copy_(piece)


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``x.sqrt()`` rounded as IEEE 754 rounds a square root (to nearest), as a processor's ``sqrt``
    instruction and the C kernels' fp16/bf16 paths compute it.

    torch's CPU ``sqrt`` is MKL's where torch is built with MKL (x86-64 wheels), which is not
    correctly rounded (on one fp32 result in 150 on an AVX-512 Intel CPU, one in 6 on an AVX2 AMD
    one); there an fp32 tensor takes its root in fp64, whose rounding to fp32 is the correctly
    rounded fp32 root (fp64 carries more than twice fp32's 24 bits plus two). Made for the fp32
    arithmetic of fp16/bf16 updates: other dtypes (and other devices, whose ``sqrt`` is IEEE's) take
    ``x.sqrt()``, which for fp64 on the CPU is MKL's again."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkl.is_available():
        return x.double().sqrt_().float()
    return x.sqrt()


TORCH_SQRT_ENV = "FUSED_OPTIM_TORCH_SQRT"
"""Set (to anything non-empty), the fp32 updates of the plugins that take :func:`update_sqrt` (FusedAdam,
FusedAdamW) use torch's CPU square root (MKL's, where torch has it) instead of the correctly rounded
one: bit for bit torch's for-loop, at MKL's cost (up to half the step on an AVX2 AMD CPU). Read at
every step. (FusedRMSprop, FusedRMSpropTF and FusedAdadelta take torch's square root in fp32 and fp64 always,
and the correctly rounded one in fp16/bf16.)"""


def torch_sqrt_requested() -> bool:
    """Whether :data:`TORCH_SQRT_ENV` is set."""
    return bool(os.environ.get(TORCH_SQRT_ENV))


def update_sqrt(dtype: torch.dtype, torch_sqrt: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The square root an update of ``dtype`` parameters takes (computed in fp32 for fp16/bf16):
    torch's for fp64, and for fp32 with ``torch_sqrt``; else :func:`correctly_rounded_sqrt`."""
    if dtype == torch.float64 or (dtype == torch.float32 and torch_sqrt):
        return torch.sqrt
    return correctly_rounded_sqrt


_SAME_SIZE_INTS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one float dtype hold the same bits (NaNs of one payload compare equal,
    ``-0.0`` and ``0.0`` do not)."""
    bits = _SAME_SIZE_INTS[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def launcher_agrees(
    candidate: Launcher,
    reference: Launcher,
    device: torch.device,
    dtype: torch.dtype,
    *,
    cases: Collection[Mapping[str, Any]],
    state_names: Collection[str],
    exact: bool,
    numel: int = 4099,
    ulps: float = 4.0,
    state_values: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    scalar_state_names: Collection[str] = (),
) -> bool:
    r"""Whether ``candidate`` computes what ``reference`` does on ``device`` for ``dtype``: the check to
    run before routing a dtype to a faster launcher (a native fused op, a compiled kernel), on the
    torch build and device at hand. A plugin's ``dtypes=`` predicate calls it (cached per dtype).

    For each hyperparameter dict of ``cases``, both launchers run a first and a second step on the
    same fresh random slices of ``numel`` elements (parameters, gradients and each state of
    ``state_names``; ``state_values(name, randn)`` shapes a state's start, e.g. ``abs`` for a
    second moment; each of ``scalar_state_names`` starts as one zero, float32, on the CPU), as one
    run of one slot (:meth:`RunInfo.whole`). Then every parameter, state and scalar state must
    agree: bit for bit if ``exact``,
    else to ``ulps`` units in the last place of ``dtype`` relative to the largest magnitude,

    .. math:: \max_i |c_i - r_i| \le \text{ulps} \cdot \varepsilon_{\text{dtype}} \cdot \max_i |r_i|.

    A candidate that raises (``RuntimeError``, ``NotImplementedError``, ``TypeError``: an op the
    build lacks) does not agree.
    """
    generator = torch.Generator().manual_seed(0)
    tolerance = ulps * torch.finfo(dtype).eps
    try:
        for hyperparams in cases:
            start = [torch.randn(numel, generator=generator, dtype=torch.float64) for _ in range(2 + len(state_names))]
            for name, index in zip(state_names, range(2, len(start))):
                if state_values is not None:
                    start[index] = state_values(name, start[index])
            start = [tensor.to(device, dtype) for tensor in start]
            runs = []
            for launcher in (reference, candidate):
                params, grads, *states = (tensor.clone() for tensor in start)
                state = dict(zip(state_names, states))
                state.update({name: torch.zeros(1) for name in scalar_state_names})
                for first_step in (True, False):
                    launcher(params, grads, state, hyperparams, RunInfo.whole(params, first_step=first_step))
                runs.append([params, *state.values()])
            for expected, actual in zip(*runs):
                if exact:
                    if not same_bits(expected, actual):
                        return False
                    continue
                scale = expected.double().abs().max().clamp_min(1e-30)
                if ((actual.double() - expected.double()).abs().max() / scale).item() > tolerance:
                    return False
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


DtypeFilter = Collection[torch.dtype] | Callable[[torch.device, torch.dtype], bool] | None


@dataclass(frozen=True)
class KernelEntry:
    kernel: str
    device_type: str
    launcher: Launcher
    dtypes: DtypeFilter
    plugin: str

    def accepts(self, device: torch.device, dtype: torch.dtype) -> bool | None:
        """True/False for an explicit dtype filter, None for 'any dtype'."""
        if self.dtypes is None:
            return None
        if callable(self.dtypes):
            return bool(self.dtypes(device, dtype))
        return dtype in self.dtypes


@dataclass(frozen=True)
class Verdict:
    """One registered launcher of a kernel, judged for a (device, dtype): :meth:`KernelRegistry.explain`."""

    launcher: str
    """The launcher's qualified name, ``module.function``."""
    plugin: str
    device_type: str
    dtypes: str
    """The registration's dtype filter: ``any``, the dtypes, or the predicate's qualified name."""
    serves: bool
    """True for the one launcher that serves (kernel, device, dtype)."""
    reason: str
    """Why it serves, or why it does not."""


def _qualified(function: Any) -> str:
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module else name


def _describe_filter(dtypes: DtypeFilter) -> str:
    if dtypes is None:
        return "any"
    if callable(dtypes):
        return _qualified(dtypes)
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes)) or "none"


class KernelRegistry:
    def __init__(self) -> None:
        self._entries: list[KernelEntry] = []
        self._resolved: dict[tuple[str, torch.device, torch.dtype], KernelEntry] = {}
        self._verdicts: dict[tuple[int, torch.device, torch.dtype], bool | None] = {}
        self._logged: set[tuple[str, torch.device, torch.dtype, int]] = set()

    @staticmethod
    def check(kernel: str, device_type: str, launcher: Any, *, plugin: str) -> None:
        """Raise :class:`PluginError`, naming ``plugin``, for a registration that cannot be served."""
        if device_type != ANY_DEVICE and device_type not in KNOWN_DEVICE_TYPES:
            raise PluginError(
                f"plugin '{plugin}' registered kernel '{kernel}' for unknown device type "
                f"'{device_type}' (known: {', '.join(sorted(KNOWN_DEVICE_TYPES))}, or '*')"
            )
        if not callable(launcher):
            raise PluginError(f"plugin '{plugin}' registered kernel '{kernel}' with a launcher that is not callable")

    def register(
        self,
        kernel: str,
        device_type: str,
        launcher: Launcher,
        dtypes: DtypeFilter = None,
        *,
        plugin: str = "<direct>",
    ) -> None:
        self.check(kernel, device_type, launcher, plugin=plugin)
        self._entries.append(KernelEntry(kernel, device_type, launcher, dtypes, plugin))
        self._resolved.clear()

    def entry(self, kernel: str, device: torch.device, dtype: torch.dtype) -> KernelEntry:
        """The entry serving (kernel, device, dtype), by the resolution order above."""
        key = (kernel, device, dtype)
        if key not in self._resolved:
            self._resolved[key] = self._find(kernel, device, dtype)
        return self._resolved[key]

    def resolve(self, kernel: str, device: torch.device, dtype: torch.dtype) -> Launcher:
        return self.entry(kernel, device, dtype).launcher

    def find(self, kernel: str, device: torch.device, dtype: torch.dtype) -> Any | None:
        """The launcher serving (kernel, device, dtype), or None where none is registered."""
        try:
            return self.entry(kernel, device, dtype).launcher
        except LookupError:
            return None

    def kernel_names(self) -> list[str]:
        """Every kernel name with a registered launcher, sorted (segment kernels included)."""
        return sorted({entry.kernel for entry in self._entries})

    def explain(self, kernel: str, device: torch.device, dtype: torch.dtype) -> list[Verdict]:
        """Every launcher registered for ``kernel``, most preferred first, each with whether it serves
        (kernel, device, dtype) and why or why not (read-only, except that a dtype predicate not yet
        asked about (device, dtype) runs now, once, as :meth:`entry` would run it)."""
        try:
            chosen: KernelEntry | None = self.entry(kernel, device, dtype)
        except LookupError:
            chosen = None
        candidates = [entry for entry in reversed(self._entries) if entry.kernel == kernel]
        order = {ANY_DEVICE: 1, device.type: 0}
        candidates.sort(key=lambda entry: order.get(entry.device_type, 2))  # stable: latest first within a level
        verdicts = []
        for entry in candidates:
            describe = _describe_filter(entry.dtypes)
            if entry.device_type not in (device.type, ANY_DEVICE):
                verdict, reason = False, f"registered for {entry.device_type} only"
            else:
                accepts = self._accepts(entry, device, dtype)
                name = str(dtype).removeprefix("torch.")
                where = "any device" if entry.device_type == ANY_DEVICE else entry.device_type
                if entry is chosen:
                    how = "with any dtype" if accepts is None else f"and its dtype filter accepts {name}"
                    verdict, reason = True, f"first match in the resolution order: registered for {where} {how}"
                elif accepts is False:
                    what = "predicate" if callable(entry.dtypes) else "set"
                    verdict, reason = False, f"its dtype {what} rejects {name} on {device}"
                else:
                    winner = _qualified(chosen.launcher) if chosen is not None else "another launcher"
                    verdict, reason = False, f"accepts {name}, but {winner} comes first in the resolution order"
            verdicts.append(
                Verdict(_qualified(entry.launcher), entry.plugin, entry.device_type, describe, verdict, reason)
            )
        return verdicts

    def _accepts(self, entry: KernelEntry, device: torch.device, dtype: torch.dtype) -> bool | None:
        """``entry.accepts``, remembered: a predicate runs once per (entry, device, dtype)."""
        key = (id(entry), device, dtype)
        if key not in self._verdicts:
            self._verdicts[key] = entry.accepts(device, dtype)
        return self._verdicts[key]

    def _log_fallback(
        self, kernel: str, device: torch.device, dtype: torch.dtype, chosen: KernelEntry, declined: list[KernelEntry]
    ) -> None:
        """Log at DEBUG, once per (kernel, device, dtype) and launcher, that ``chosen`` serves because
        ``declined`` (preferred to it) said no."""
        key = (kernel, device, dtype, id(chosen))
        if not declined or key in self._logged or not logger.isEnabledFor(logging.DEBUG):
            return
        self._logged.add(key)
        logger.debug(
            "kernel %r on %s with %s: %s (plugin %s) serves, as %s declined; KernelRegistry.explain() says more",
            kernel,
            device,
            str(dtype).removeprefix("torch."),
            _qualified(chosen.launcher),
            chosen.plugin,
            ", ".join(
                f"{_qualified(entry.launcher)} (dtype {'predicate' if callable(entry.dtypes) else 'set'} "
                f"{_describe_filter(entry.dtypes)})"
                for entry in declined
            ),
        )

    def _find(self, kernel: str, device: torch.device, dtype: torch.dtype) -> KernelEntry:
        candidates = [entry for entry in reversed(self._entries) if entry.kernel == kernel]
        declined: list[KernelEntry] = []  # preferred to the one found, had they accepted
        for device_type in (device.type, ANY_DEVICE):
            verdicts = [
                (entry, self._accepts(entry, device, dtype)) for entry in candidates if entry.device_type == device_type
            ]
            for wanted in (True, None):
                for index, (entry, verdict) in enumerate(verdicts):
                    if verdict is wanted:
                        # Within the level, a declining launcher would have won if newer (than one
                        # accepting the dtype) or at all (than one for any dtype).
                        rivals = verdicts[:index] if wanted else verdicts
                        declined += [other for other, said in rivals if said is False]
                        self._log_fallback(kernel, device, dtype, entry, declined)
                        return entry
            declined += [entry for entry, verdict in verdicts if verdict is False]
        registered = sorted({(entry.device_type, entry.plugin) for entry in candidates})
        raise LookupError(
            f"no launcher for kernel '{kernel}' on {device} with {dtype}; registered: {registered or 'none'}"
        )
