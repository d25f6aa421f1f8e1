"""The C kernels (``csrc/rmsprop.c`` through the segment launchers of :mod:`fused_rmsprop.c_launchers`)
against torch.

* fp32 and fp64: torch.optim.RMSprop / Adadelta(foreach=False) and the reference RMSpropTF, bit for bit,
  parameters, every state tensor and the step counts, over several steps of parameters of odd sizes
  whose gradients are separate tensors; one slot skips a step, one gets its first gradient late, and
  the state buffers start out as NaN (a slot's state must not be read before it is initialised).
* fp16 and bf16: the same optimizers in fp32 on upcast copies whose parameters and state are rounded
  to the dtype after every step (the kernel's one rounding per step), bit for bit.
* One thread or two, gradients apart or back to back in one buffer (slots merged into segments): the
  same bits. Where torch computes sqrt with MKL, the kernel does too.
"""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch

from fused_core import native
from fused_core.kernels import DTYPE_SUFFIXES, GradSegments, same_bits
from fused_rmsprop import c_kernel, c_launchers
from fused_rmsprop.kernels import low_precision_sqrt
from fused_rmsprop.reference import RMSpropTF
from fused_testing.roots import fp32_sqrt_replaced

SIZES = (1, 7, 33, 300, 70001)
STEPS = 3
LATE, SKIPPING = 4, 2
"""The slot whose first gradient comes at the second step, and the slot with none at the second step."""


def has_grad(step: int, slot: int) -> bool:
    return not (step == 0 and slot == LATE) and not (step == 1 and slot == SKIPPING)


@pytest.fixture(scope="module")
def library() -> native.NativeLibrary:
    library = c_launchers.c_library()
    if library is None:
        reason = native.unavailable_reason(c_kernel.C_SOURCE)
        words = shlex.split(os.environ.get("CC") or "cc")
        if os.environ.get(native.DISABLE_ENV) or not words or shutil.which(words[0]) is None:
            pytest.skip(f"no C kernel to test: {reason}")
        pytest.fail(f"{c_kernel.C_SOURCE.name} did not load although a compiler is on PATH: {reason}")
    return library


# kernel -> (the reference class, its state buffers, cases: id -> hyperparameters)
KERNELS = {
    "rmsprop": (
        torch.optim.RMSprop,
        ("square_avg", "momentum_buffer", "grad_avg"),
        {
            "plain": dict(lr=1e-2),
            "wd_maximize": dict(lr=1e-2, weight_decay=0.1, maximize=True),
            "momentum": dict(lr=1e-2, momentum=0.9, alpha=0.9),
            "centered": dict(lr=1e-2, centered=True, eps=1e-6),
            "centered_momentum_wd_tensor_lr": dict(
                lr=torch.tensor(1e-3), centered=True, momentum=0.5, weight_decay=0.1
            ),
            "alpha_below_half": dict(lr=1e-2, alpha=0.3, centered=True, maximize=True),
        },
    ),
    "rmsprop_tf": (
        RMSpropTF,
        ("square_avg", "momentum_buffer", "grad_avg"),
        {
            "plain": dict(lr=1e-2),
            "momentum_lr_in_buffer": dict(lr=1e-2, momentum=0.9, eps=1e-3),
            "momentum_torch_l2_maximize": dict(
                lr=1e-2, momentum=0.9, lr_in_momentum=False, weight_decay=0.1, maximize=True
            ),
            "centered_decoupled": dict(lr=1e-2, centered=True, weight_decay=0.1, decoupled_decay=True),
            "centered_momentum_tensor_lr": dict(lr=torch.tensor(1e-3), centered=True, momentum=0.5, alpha=0.5),
        },
    ),
    "adadelta": (
        torch.optim.Adadelta,
        ("square_avg", "acc_delta"),
        {
            "plain": dict(lr=1.0),
            "wd_maximize": dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True),
            "rho_below_half_tensor_lr": dict(lr=torch.tensor(0.9), rho=0.3, eps=1e-3),
        },
    ),
}
CASES = [(kernel, name) for kernel, (_, _, cases) in KERNELS.items() for name in cases]


def full_hp(kernel: str, config: dict) -> dict:
    """The whole param group the reference builds from ``config``."""
    reference = KERNELS[kernel][0]
    return dict(reference([torch.nn.Parameter(torch.zeros(1))], **config).param_groups[0], params=None)


def data(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Parameters of SIZES and STEPS steps of gradients for them, of varied magnitudes."""
    generator = torch.Generator().manual_seed(seed)

    def randn(n: int, scale: float) -> torch.Tensor:
        return (torch.randn(n, generator=generator, dtype=torch.float64) * scale).to(dtype)

    return [randn(n, 1.0) for n in SIZES], [[randn(n, 10.0 ** (step - 1)) for n in SIZES] for step in range(STEPS)]


class Kernel:
    """SIZES parameters in one flat buffer, stepped by a segment launcher as torch steps them."""

    def __init__(self, kernel: str, params: list[torch.Tensor], hp: dict, threads: int) -> None:
        self.kernel, self.hp, self.threads = kernel, hp, threads
        self.flat = torch.cat(params)
        # Garbage where no slot has been initialised: the kernel must not read it.
        self.state = {name: torch.full_like(self.flat, float("nan")) for name in KERNELS[kernel][1]}
        self.state["step"] = torch.full((len(SIZES),), float("nan"))
        self.numels = torch.tensor(SIZES, dtype=torch.int64)
        self.offsets = torch.cumsum(self.numels, 0) - self.numels
        self.initialized = torch.zeros(len(SIZES), dtype=torch.uint8)

    def step(self, grads: list[torch.Tensor | None]) -> None:
        segments = GradSegments(
            ptrs=torch.tensor([0 if g is None else g.data_ptr() for g in grads], dtype=torch.int64),
            has_grad=torch.tensor([g is not None for g in grads], dtype=torch.int8),
            offsets=self.offsets,
            numels=self.numels,
            initialized=self.initialized,
        )
        launcher = getattr(c_launchers, f"{self.kernel}_c_segments")
        fresh = int(((self.initialized == 0) & (segments.has_grad != 0)).sum())
        torch.set_num_threads(self.threads)
        try:
            assert launcher(self.flat, self.state, segments, self.hp) == fresh
        finally:
            torch.set_num_threads(THREADS)
        self.initialized[self.initialized == 2] = 1

    def pieces(self, name: str) -> list[torch.Tensor]:
        if name == "step":
            return list(self.state["step"].split(1))
        tensor = self.flat if name == "param" else self.state[name]
        return list(tensor.split(self.numels.tolist()))


THREADS = torch.get_num_threads()


def run_kernel(kernel: str, dtype: torch.dtype, hp: dict, threads: int = 2, bound: bool = False) -> Kernel:
    params, grads = data(dtype)
    stepped = Kernel(kernel, params, hp, threads)
    for step in range(STEPS):
        # bound: one gradient buffer, slots back to back; else copies that lie apart
        pieces = list(torch.cat(grads[step]).split(list(SIZES))) if bound else [g.clone() for g in grads[step]]
        stepped.step([g if has_grad(step, i) else None for i, g in enumerate(pieces)])
    return stepped


def reference_run(kernel: str, dtype: torch.dtype, config: dict, check=None) -> tuple[torch.optim.Optimizer, list]:
    """The reference over per-parameter tensors (in fp32 with the low-precision square root, rounded to
    ``dtype`` after every step, where ``dtype`` is fp16/bf16); ``check(step, optimizer, leaves)`` after
    every step."""
    low = dtype in (torch.float16, torch.bfloat16)
    with fp32_sqrt_replaced(low_precision_sqrt(dtype) if low else None):
        return _reference_run(kernel, dtype, config, check, low)


def _reference_run(
    kernel: str, dtype: torch.dtype, config: dict, check, low: bool
) -> tuple[torch.optim.Optimizer, list]:
    params, grads = data(dtype)
    leaves = [(p.float() if low else p.clone()).requires_grad_() for p in params]
    cls = KERNELS[kernel][0]
    optimizer = cls(leaves, foreach=False, **config)
    for step in range(STEPS):
        for i, (leaf, grad) in enumerate(zip(leaves, grads[step])):
            leaf.grad = (grad.float() if low else grad.clone()) if has_grad(step, i) else None
        optimizer.step()
        if low:
            with torch.no_grad():
                for leaf in leaves:
                    for tensor in (leaf, *optimizer.state.get(leaf, {}).values()):
                        if tensor.dim() > 0:
                            tensor.copy_(tensor.to(dtype).float())
        if check is not None:
            check(step, optimizer, leaves)
    return optimizer, leaves


def assert_same(stepped: Kernel, name: str, want: list[torch.Tensor | None], what: str) -> None:
    for slot, (mine, theirs) in enumerate(zip(stepped.pieces(name), want)):
        if theirs is not None:
            theirs = theirs.detach().to(mine.dtype)
            differing = int((mine != theirs).sum())
            assert same_bits(mine, theirs), f"{what}: slot {slot} ({mine.numel()} elements) {name}: {differing} differ"


@pytest.mark.parametrize("kernel,case", CASES, ids=[f"{k}-{c}" for k, c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_bit_for_bit(library, kernel: str, case: str, dtype: torch.dtype) -> None:
    """Parameters, state and step counts equal the reference's after every step, slot by slot."""
    config = KERNELS[kernel][2][case]
    params, grads = data(dtype)
    stepped = Kernel(kernel, params, full_hp(kernel, config), threads=2)

    def check(step: int, optimizer: torch.optim.Optimizer, leaves: list) -> None:
        stepped.step([grads[step][i].clone() if has_grad(step, i) else None for i in range(len(SIZES))])
        what = f"{kernel} {case} step {step + 1}"
        assert_same(stepped, "param", leaves, what)
        for name in KERNELS[kernel][1]:
            assert_same(stepped, name, [optimizer.state.get(leaf, {}).get(name) for leaf in leaves], what)
        steps = [optimizer.state[leaf]["step"] if leaf in optimizer.state else None for leaf in leaves]
        assert_same(stepped, "step", [None if s is None else s.reshape(1) for s in steps], what)

    reference_run(kernel, dtype, config, check)


LOW_PRECISION_CASES = [
    ("rmsprop", "centered_momentum_wd_tensor_lr"),
    ("rmsprop", "alpha_below_half"),
    ("rmsprop_tf", "momentum_torch_l2_maximize"),
    ("rmsprop_tf", "centered_decoupled"),
    ("adadelta", "wd_maximize"),
]


@pytest.mark.parametrize("kernel,case", LOW_PRECISION_CASES, ids=[f"{k}-{c}" for k, c in LOW_PRECISION_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_is_fp32_math_rounded_once(library, kernel: str, case: str, dtype: torch.dtype) -> None:
    """fp16/bf16: what the fp32 update of upcast values gives, rounded once per step."""
    config = KERNELS[kernel][2][case]
    optimizer, leaves = reference_run(kernel, dtype, config)
    stepped = run_kernel(kernel, dtype, full_hp(kernel, config))
    assert_same(stepped, "param", leaves, str(dtype))
    for name in KERNELS[kernel][1]:
        assert_same(stepped, name, [optimizer.state[leaf].get(name) for leaf in leaves], str(dtype))


@pytest.mark.parametrize(
    "kernel,case",
    [("rmsprop", "centered_momentum_wd_tensor_lr"), ("rmsprop_tf", "centered_decoupled"), ("adadelta", "wd_maximize")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_threads_and_bound_gradients_give_the_same_bits(library, kernel: str, case: str, dtype: torch.dtype) -> None:
    """One thread or two, gradients apart or back to back (merged segments): the same bits."""
    hp = full_hp(kernel, KERNELS[kernel][2][case])
    runs = [run_kernel(kernel, dtype, hp, threads, bound) for threads, bound in ((1, False), (2, False), (2, True))]
    for other in runs[1:]:
        for name in ("param", *KERNELS[kernel][1]):
            assert_same(other, name, runs[0].pieces(name), str(dtype))


def test_the_cpu_is_served_by_the_c_kernels(library) -> None:
    """Every dtype on the CPU: the C launchers, flat and segments, for all three kernels."""
    from fused_core import registry
    from fused_rmsprop import FusedRMSprop

    FusedRMSprop([torch.nn.Parameter(torch.zeros(1))])  # registers the plugin
    for kernel in KERNELS:
        for dtype in DTYPE_SUFFIXES:
            cpu = torch.device("cpu")
            assert registry.kernels.resolve(kernel, cpu, dtype) is getattr(c_launchers, f"{kernel}_c_flat")
            assert registry.kernels.resolve(f"{kernel}[segments]", cpu, dtype) is getattr(
                c_launchers, f"{kernel}_c_segments"
            )


def test_sqrt_is_torchs(library) -> None:
    """Where torch computes sqrt with MKL (not correctly rounded), the kernel calls MKL too."""
    assert bool(library.cdll.rmsprop_sqrt_is_mkl()) == torch.backends.mkl.is_available()
