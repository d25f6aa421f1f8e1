"""The C Adam kernel (``csrc/adam.c`` through :mod:`fused_adam.c_kernel`) against torch.

* fp32 and fp64: torch.optim.Adam/AdamW(foreach=False), bit for bit, parameters and every state
  tensor, over several steps of parameters of odd sizes whose gradients are separate tensors; one
  slot skips a step, one gets its first gradient late (so the slots' step counts differ), and the
  state buffers start out as NaN (a slot's state must not be read before it is initialised).
* fp16 and bf16: the fp32 arithmetic on upcast copies (torch.optim.Adam in fp32, whose parameters
  and state are rounded to the dtype after every step), rounded once, bit for bit.
* One thread or two, the same bits; bound gradients (back to back in one buffer, so that slots
  merge into one segment) the same bits as separate ones.
"""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch

from fused_adam import c_kernel
from fused_core import native
from fused_core.kernels import GradSegments, same_bits, torch_sqrt_requested

SIZES = (1, 7, 33, 1000, 70001)
STEPS = 3
LATE, SKIPPING = 4, 2
"""The slot whose first gradient comes at the second step, and the slot with none at the second step."""
STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _has_grad(step: int, slot: int) -> bool:
    return not (step == 0 and slot == LATE) and not (step == 1 and slot == SKIPPING)


@pytest.fixture(scope="module")
def library() -> native.NativeLibrary:
    library = c_kernel.load()
    if library is None:
        reason = native.unavailable_reason(c_kernel.C_SOURCE)
        words = shlex.split(os.environ.get("CC") or "cc")
        if os.environ.get(native.DISABLE_ENV) or not words or shutil.which(words[0]) is None:
            pytest.skip(f"no C kernel to test: {reason}")
        pytest.fail(f"{c_kernel.C_SOURCE.name} did not load although a compiler is on PATH: {reason}")
    return library


def _hp(decoupled: bool, amsgrad: bool, maximize: bool, weight_decay: float, lr, betas=(0.9, 0.999), eps=1e-8):
    return dict(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled,
    )


def _data(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Parameters of SIZES and STEPS steps of gradients for them, of varied magnitudes."""
    generator = torch.Generator().manual_seed(seed)

    def randn(n: int, scale: float) -> torch.Tensor:
        return (torch.randn(n, generator=generator, dtype=torch.float64) * scale).to(dtype)

    params = [randn(n, 1.0) for n in SIZES]
    grads = [[randn(n, 10.0 ** (step - 1)) for n in SIZES] for step in range(STEPS)]
    return params, grads


class Kernel:
    """The C kernel's view of SIZES parameters in one flat buffer, stepped as torch steps them."""

    def __init__(self, library, params: list[torch.Tensor], hp: dict, threads: int) -> None:
        self.library, self.hp, self.threads = library, hp, threads
        self.flat = torch.cat(params)
        dtype = self.flat.dtype
        # Garbage where no slot has been initialised: the kernel must not read it.
        self.state = {name: torch.full_like(self.flat, float("nan")) for name in STATE}
        self.numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        self.offsets = torch.cumsum(self.numels, 0) - self.numels
        self.initialized = torch.zeros(len(params), dtype=torch.uint8)
        self.steps = torch.zeros(len(params), dtype=torch.float64)
        self.dtype = dtype

    def step(self, grads: list[torch.Tensor | None]) -> int:
        has_grad = torch.tensor([g is not None for g in grads], dtype=torch.int8)
        self.steps += has_grad.double()  # as torch: +1 where a gradient is
        segments = GradSegments(
            ptrs=torch.tensor([0 if g is None else g.data_ptr() for g in grads], dtype=torch.int64),
            has_grad=has_grad,
            offsets=self.offsets,
            numels=self.numels,
            initialized=self.initialized,
        )
        before = self.initialized.clone()
        started = c_kernel.call(
            self.library, self.flat, self.state, segments, self.hp, self.steps, self.threads, torch_sqrt_requested()
        )
        newly = (before == 0) & (has_grad != 0)
        assert started == int(newly.sum())
        assert torch.equal(self.initialized[newly], torch.full((int(newly.sum()),), 2, dtype=torch.uint8))
        assert torch.equal(self.initialized[~newly], before[~newly])
        self.initialized[self.initialized == 2] = 1
        return started

    def pieces(self, name: str) -> list[torch.Tensor]:
        tensor = self.flat if name == "param" else self.state[name]
        return list(tensor.split(self.numels.tolist()))


def _run_kernel(library, dtype, hp, threads=2, bound=False, seed=0) -> Kernel:
    params, grads = _data(dtype, seed)
    kernel = Kernel(library, params, hp, threads)
    for step in range(STEPS):
        if bound:  # one gradient buffer, slots back to back
            flat = torch.cat(grads[step])
            pieces = list(flat.split(list(SIZES)))
        else:  # separate tensors, and copies so that no two lie back to back by chance
            pieces = [g.clone() for g in grads[step]]
        kernel.step([g if _has_grad(step, i) else None for i, g in enumerate(pieces)])
    return kernel


def _torch_optimizer(params: list[torch.Tensor], hp: dict) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    leaves = [p.clone().requires_grad_() for p in params]
    kwargs = {k: v for k, v in hp.items() if k != "decoupled_weight_decay"}
    cls = torch.optim.AdamW if hp["decoupled_weight_decay"] else torch.optim.Adam
    return cls(leaves, foreach=False, **kwargs), leaves


def _assert_same(kernel: Kernel, name: str, want: list[torch.Tensor | None], what: str) -> None:
    for slot, (mine, theirs) in enumerate(zip(kernel.pieces(name), want)):
        if theirs is None:
            continue
        differing = int((mine != theirs).sum()) if mine.shape == theirs.shape else "shape"
        assert same_bits(mine, theirs), f"{what}: slot {slot} ({mine.numel()} elements) {name}: {differing} differ"


CASES = [
    _hp(decoupled, amsgrad, maximize, weight_decay, lr)
    for decoupled in (False, True)
    for amsgrad in (False, True)
    for maximize in (False, True)
    for weight_decay in (0.0, 0.1)
    for lr in ("float", "tensor")
] + [
    # beta1 < 0.5: lerp's other branch (weight >= 0.5); beta1 = 0: weight 1
    _hp(False, True, False, 0.01, "float", betas=(0.3, 0.5), eps=1e-3),
    _hp(True, False, True, 0.05, "tensor", betas=(0.0, 0.9), eps=1e-6),
]


def _case_id(hp: dict) -> str:
    kind = "AdamW" if hp["decoupled_weight_decay"] else "Adam"
    flags = [f for f in ("amsgrad", "maximize") if hp[f]]
    return "-".join([kind, *flags, f"wd{hp['weight_decay']}", f"lr_{hp['lr']}", f"b{hp['betas'][0]}"])


def _with_lr(hp: dict) -> dict:
    """``lr`` as a float, or as torch.tensor(1e-3) (float32) where the case says "tensor"."""
    return dict(hp, lr=torch.tensor(1e-3) if hp["lr"] == "tensor" else 1e-3)


@pytest.mark.parametrize("hp", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_adam_bit_for_bit(library, dtype: torch.dtype, hp: dict) -> None:
    """Parameters, exp_avg, exp_avg_sq (max_exp_avg_sq) and step counts equal
    torch.optim.Adam/AdamW(foreach=False)'s after every step, slot by slot."""
    hp = _with_lr(hp)
    params, grads = _data(dtype)
    optimizer, leaves = _torch_optimizer(params, hp)
    kernel = Kernel(library, params, hp, threads=2)
    for step in range(STEPS):
        present = [_has_grad(step, i) for i in range(len(SIZES))]
        for leaf, grad, has in zip(leaves, grads[step], present):
            leaf.grad = grad.clone() if has else None
        optimizer.step()
        kernel.step([grad.clone() if has else None for grad, has in zip(grads[step], present)])
        what = f"step {step + 1}"
        _assert_same(kernel, "param", [leaf.detach() for leaf in leaves], what)
        names = STATE if hp["amsgrad"] else STATE[:2]
        for name in names:
            _assert_same(kernel, name, [optimizer.state.get(leaf, {}).get(name) for leaf in leaves], what)
        torch_steps = [float(optimizer.state.get(leaf, {}).get("step", 0.0)) for leaf in leaves]
        assert kernel.steps.tolist() == torch_steps, what


@pytest.mark.parametrize("hp", CASES, ids=_case_id)
def test_default_fp32_is_torchs_up_to_the_square_roots_rounding(library, default_sqrt, hp: dict) -> None:
    """The default fp32 kernel (correctly rounded square root) against torch.optim.Adam/AdamW
    (foreach=False), whose CPU square root is MKL's: parameters and state within 1e-6 of the largest
    value after every step, step counts equal; and no further from a float64 run than torch."""
    hp = _with_lr(hp)
    params, grads = _data(torch.float32)
    optimizer, leaves = _torch_optimizer(params, hp)
    oracle, oracle_leaves = _torch_optimizer([p.double() for p in params], hp)
    kernel = Kernel(library, params, hp, threads=2)
    for step in range(STEPS):
        present = [_has_grad(step, i) for i in range(len(SIZES))]
        for leaf, other, grad, has in zip(leaves, oracle_leaves, grads[step], present):
            leaf.grad, other.grad = (grad.clone(), grad.double()) if has else (None, None)
        optimizer.step()
        oracle.step()
        kernel.step([grad.clone() if has else None for grad, has in zip(grads[step], present)])
        for mine, theirs, exact in zip(kernel.pieces("param"), leaves, oracle_leaves):
            theirs, exact = theirs.detach().double(), exact.detach()
            assert (mine.double() - theirs).abs().max() <= 1e-6 * theirs.abs().max(), f"step {step + 1}"
            assert (mine.double() - exact).abs().max() <= (theirs - exact).abs().max() + 1e-7 * exact.abs().max()
        torch_steps = [float(optimizer.state.get(leaf, {}).get("step", 0.0)) for leaf in leaves]
        assert kernel.steps.tolist() == torch_steps


def _rounded_reference(dtype: torch.dtype, hp: dict) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """torch.optim.Adam(W) in fp32 on upcast copies, parameters and state rounded to ``dtype`` after
    every step (the kernel's one rounding per step); the final values, in ``dtype``."""
    params, grads = _data(dtype)
    optimizer, leaves = _torch_optimizer([p.float() for p in params], hp)
    for step in range(STEPS):
        for i, (leaf, grad) in enumerate(zip(leaves, grads[step])):
            leaf.grad = grad.float() if _has_grad(step, i) else None
        optimizer.step()
        with torch.no_grad():
            for leaf in leaves:
                for tensor in (leaf, *(optimizer.state.get(leaf, {}).get(name) for name in STATE)):
                    if tensor is not None and tensor.is_floating_point() and tensor.dim() > 0:
                        tensor.copy_(tensor.to(dtype).float())
    state = {
        name: [optimizer.state[leaf][name].to(dtype) for leaf in leaves]
        for name in STATE
        if name in optimizer.state[leaves[0]]
    }
    return [leaf.detach().to(dtype) for leaf in leaves], state


@pytest.mark.parametrize(
    "hp",
    [
        _hp(False, False, False, 0.0, "float"),
        _hp(True, True, True, 0.1, "tensor"),
        _hp(False, True, False, 0.1, "float", betas=(0.3, 0.5), eps=1e-3),
    ],
    ids=_case_id,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_is_fp32_math_rounded_once(library, dtype: torch.dtype, hp: dict) -> None:
    """fp16/bf16: what the fp32 update of upcast values gives, rounded once per step."""
    hp = _with_lr(hp)
    params, state = _rounded_reference(dtype, hp)
    kernel = _run_kernel(library, dtype, hp)
    _assert_same(kernel, "param", params, dtype)
    for name, want in state.items():
        _assert_same(kernel, name, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_threads_and_bound_gradients_give_the_same_bits(library, dtype: torch.dtype) -> None:
    """One thread or two, gradients apart or back to back (merged segments whose slots' step
    counts differ): the same bits."""
    hp = _with_lr(_hp(True, True, False, 0.1, "float"))
    runs = [_run_kernel(library, dtype, hp, threads, bound) for threads, bound in ((1, False), (2, False), (2, True))]
    for other in runs[1:]:
        for name in ("param", *STATE):
            _assert_same(other, name, runs[0].pieces(name), f"{dtype}")


def test_sqrt_is_torchs(library) -> None:
    """Where torch computes sqrt with MKL (not correctly rounded), the kernel calls MKL too."""
    assert bool(library.cdll.adam_sqrt_is_mkl()) == torch.backends.mkl.is_available()


def test_lr_tensor_is_computed_in_float32(library) -> None:
    """A float32 tensor lr changes the bits (float32 step size), so the lr_single path is exercised."""
    hp = _hp(True, False, False, 0.1, "float")
    as_tensor = _run_kernel(library, torch.float32, _with_lr(dict(hp, lr="tensor")))
    as_float = _run_kernel(library, torch.float32, _with_lr(hp))
    assert not same_bits(as_tensor.flat, as_float.flat)
