"""The C Lion kernel (``csrc/lion.c`` through :mod:`fused_lion.c_kernel`) against the reference.

* fp32 and fp64: :class:`fused_lion.reference.Lion` (foreach=False), bit for bit, parameters and
  ``exp_avg``, over several steps of parameters of odd sizes whose gradients are separate tensors;
  one slot skips a step, one gets its first gradient late, and the state buffer starts out as NaN
  (a slot's state must not be read before it is initialised).
* fp16 and bf16: the fp32 arithmetic on upcast copies (the reference in fp32, its parameters and
  state rounded to the dtype after every step), rounded once, bit for bit.
* One thread or two, the same bits; bound gradients (back to back in one buffer, so that slots
  merge into one segment, one of them starting its state) the same bits as separate ones.
* Every flag set of fused_core.native gives the composite's bits, and the load-time self-check
  rejects a build that rounds once more than the composite.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_core import native
from fused_core.kernels import GradSegments, RunInfo, same_bits
from fused_lion import c_kernel
from fused_lion.kernels import c_kernel_matches_composite, lion_composite
from fused_lion.reference import Lion
from fused_testing.native import c_compiler, require_library

SIZES = (1, 7, 33, 1000, 70001)
STEPS = 3
LATE, SKIPPING = 4, 2
"""The slot whose first gradient comes at the second step, and the slot with none at the second step."""
SIGNATURES = {name: c_kernel.C_SIGNATURE for name in c_kernel.C_SEGMENT_FUNCTIONS.values()}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _has_grad(step: int, slot: int) -> bool:
    return not (step == 0 and slot == LATE) and not (step == 1 and slot == SKIPPING)


@pytest.fixture(scope="module")
def library() -> native.NativeLibrary:
    return require_library(c_kernel.load(), c_kernel.C_SOURCE)


def _hp(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, maximize=False) -> dict:
    return dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)


CASES = [
    _hp(lr=lr, weight_decay=weight_decay, maximize=maximize)
    for lr in (1e-3, "tensor")
    for weight_decay in (0.0, 0.3)
    for maximize in (False, True)
] + [_hp(betas=(0.0, 0.5), weight_decay=0.1), _hp(betas=(0.5, 0.0), lr="tensor", maximize=True)]


def _case_id(hp: dict) -> str:
    return f"lr_{hp['lr']}-wd{hp['weight_decay']}-b{hp['betas']}" + ("-maximize" if hp["maximize"] else "")


def _with_lr(hp: dict) -> dict:
    """``lr`` as given, or as torch.tensor(3e-3) (float32) where the case says "tensor"."""
    return dict(hp, lr=torch.tensor(3e-3) if hp["lr"] == "tensor" else hp["lr"])


def _data(dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Parameters of SIZES and STEPS steps of gradients for them, of varied magnitudes."""
    generator = torch.Generator().manual_seed(seed)

    def randn(n: int, scale: float) -> torch.Tensor:
        return (torch.randn(n, generator=generator, dtype=torch.float64) * scale).to(dtype)

    return [randn(n, 1.0) for n in SIZES], [[randn(n, 10.0 ** (step - 1)) for n in SIZES] for step in range(STEPS)]


@pytest.fixture
def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


class Kernel:
    """The C kernel's view of SIZES parameters in one flat buffer, stepped as the reference steps them."""

    def __init__(self, library, params: list[torch.Tensor], hp: dict, threads: int) -> None:
        self.library, self.hp, self.threads = library, hp, threads
        self.flat = torch.cat(params)
        self.exp_avg = torch.full_like(self.flat, float("nan"))  # garbage: must not be read
        self.numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        self.offsets = torch.cumsum(self.numels, 0) - self.numels
        self.initialized = torch.zeros(len(params), dtype=torch.uint8)

    def step(self, grads: list[torch.Tensor | None]) -> None:
        has_grad = torch.tensor([g is not None for g in grads], dtype=torch.int8)
        segments = GradSegments(
            ptrs=torch.tensor([0 if g is None else g.data_ptr() for g in grads], dtype=torch.int64),
            has_grad=has_grad,
            offsets=self.offsets,
            numels=self.numels,
            initialized=self.initialized,
        )
        before = self.initialized.clone()
        started = c_kernel.call(self.library, self.flat, self.exp_avg, segments, self.hp, self.threads)
        newly = (before == 0) & (has_grad != 0)
        assert started == int(newly.sum())
        assert torch.equal(self.initialized[newly], torch.full((started,), 2, dtype=torch.uint8))
        assert torch.equal(self.initialized[~newly], before[~newly])
        self.initialized[self.initialized == 2] = 1

    def pieces(self, name: str) -> list[torch.Tensor]:
        return list((self.flat if name == "param" else self.exp_avg).split(self.numels.tolist()))


def _run_kernel(library, dtype, hp, seed, threads=2, bound=False) -> Kernel:
    params, grads = _data(dtype, seed)
    kernel = Kernel(library, params, hp, threads)
    for step in range(STEPS):
        if bound:  # one gradient buffer, slots back to back
            pieces = list(torch.cat(grads[step]).split(list(SIZES)))
        else:  # separate tensors, copies so that no two lie back to back by chance
            pieces = [g.clone() for g in grads[step]]
        kernel.step([g if _has_grad(step, i) else None for i, g in enumerate(pieces)])
    return kernel


def _assert_same(kernel: Kernel, name: str, want: list[torch.Tensor | None], what: str) -> None:
    for slot, (mine, theirs) in enumerate(zip(kernel.pieces(name), want)):
        if theirs is not None:
            differing = int((mine != theirs).sum())
            assert same_bits(mine, theirs), f"{what}: slot {slot} ({mine.numel()} elements) {name}: {differing} differ"


def _reference_run(params: list[torch.Tensor], grads, hp: dict, dtype: torch.dtype, upcast: bool):
    """The reference over STEPS steps (in fp32 on upcast copies, rounded to ``dtype`` after every
    step, when ``upcast``); yields after each step its parameters and exp_avg (None: no state yet)."""
    leaves = [(p.float() if upcast else p.clone()).requires_grad_() for p in params]
    optimizer = Lion(leaves, **hp)
    for step in range(STEPS):
        for i, (leaf, grad) in enumerate(zip(leaves, grads[step])):
            leaf.grad = (grad.float() if upcast else grad.clone()) if _has_grad(step, i) else None
        optimizer.step()
        if upcast:
            with torch.no_grad():
                for leaf in leaves:
                    for tensor in (leaf, optimizer.state.get(leaf, {}).get("exp_avg")):
                        if tensor is not None:
                            tensor.copy_(tensor.to(dtype).float())
        yield (
            [leaf.detach().to(dtype) for leaf in leaves],
            [optimizer.state[leaf]["exp_avg"].to(dtype) if leaf in optimizer.state else None for leaf in leaves],
        )


@pytest.mark.parametrize("hp", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_bit_for_bit(library, dtype: torch.dtype, hp: dict, seed: int) -> None:
    """Parameters and exp_avg equal the reference's after every step, slot by slot."""
    hp = _with_lr(hp)
    params, grads = _data(dtype, seed)
    kernel = Kernel(library, params, hp, threads=2)
    for step, (want_params, want_state) in enumerate(_reference_run(params, grads, hp, dtype, upcast=False)):
        kernel.step([g.clone() if _has_grad(step, i) else None for i, g in enumerate(grads[step])])
        _assert_same(kernel, "param", want_params, f"step {step + 1}, seed {seed}")
        _assert_same(kernel, "exp_avg", want_state, f"step {step + 1}, seed {seed}")


@pytest.mark.parametrize("hp", [CASES[0], CASES[7], CASES[-1]], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_is_fp32_math_rounded_once(library, dtype: torch.dtype, hp: dict, seed: int) -> None:
    """fp16/bf16: what the fp32 update of upcast values gives, rounded once per step."""
    hp = _with_lr(hp)
    params, grads = _data(dtype, seed)
    *_, (want_params, want_state) = _reference_run(params, grads, hp, dtype, upcast=True)
    kernel = _run_kernel(library, dtype, hp, seed)
    _assert_same(kernel, "param", want_params, f"{dtype}, seed {seed}")
    _assert_same(kernel, "exp_avg", want_state, f"{dtype}, seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threads_and_bound_gradients_give_the_same_bits(library, dtype: torch.dtype, seed: int) -> None:
    """One thread or two, gradients apart or back to back (merged segments, one of whose slots
    starts its state): the same bits."""
    hp = _hp(lr=1e-2, weight_decay=0.1, maximize=True)
    ways = ((1, False), (2, False), (2, True))
    runs = [_run_kernel(library, dtype, hp, seed, threads, bound) for threads, bound in ways]
    for other in runs[1:]:
        for name in ("param", "exp_avg"):
            _assert_same(other, name, runs[0].pieces(name), f"{dtype}, seed {seed}")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], native.NativeLibrary]:
    """csrc/lion.c built with each of fused_core.native.FLAG_SETS, unchecked (the test checks)."""
    if c_compiler() is None or os.environ.get(native.DISABLE_ENV):
        pytest.skip("no C compiler, or native kernels disabled")
    libraries = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(native.CACHE_ENV, str(tmp_path_factory.mktemp("lion-builds")))
        for flags in native.FLAG_SETS:
            library = native.load_library(c_kernel.C_SOURCE, SIGNATURES, flag_sets=(flags,), extra=("-lm",))
            assert library is not None, native.unavailable_reason(c_kernel.C_SOURCE, flag_sets=(flags,))
            libraries[flags] = library
    return libraries


def _flat_run(launcher, dtype: torch.dtype, hp: dict, seed: int, numel: int = 100_003) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    params = torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype)
    exp_avg = torch.full_like(params, float("nan"))
    for step in range(STEPS):
        grads = torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype)
        launcher(params, grads, {"exp_avg": exp_avg}, hp, RunInfo.whole(params, first_step=step == 0))
    return params, exp_avg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_build_gives_the_composite_bits(builds, dtype: torch.dtype, seed: int) -> None:
    """Built with each flag set (tuned for this CPU, portable with OpenMP, portable single-threaded),
    the kernel gives lion_composite's bits, so ranks with different builds do not drift apart."""
    for hp in map(_with_lr, CASES):
        want = _flat_run(lion_composite, dtype, hp, seed)
        for flags, library in builds.items():

            def flat(params, grads, state, hp, run, library=library):
                segments = GradSegments.whole(grads, initialized=not run.first_step)
                c_kernel.call(library, params, state["exp_avg"], segments, hp)

            for name, mine, theirs in zip(("param", "exp_avg"), _flat_run(flat, dtype, hp, seed), want):
                assert same_bits(mine, theirs), f"{' '.join(flags)} {_case_id(hp)} {name}, seed {seed}"


def test_the_self_check_rejects_a_build_that_rounds_once_more(library, tmp_path, monkeypatch) -> None:
    """csrc/lion.c with ``m * beta2 + g * c2`` (two roundings) instead of ATen's fused multiply-add for
    the momentum: within an ulp of the composite, not its bits. The self-check rejects every build."""
    text = c_kernel.C_SOURCE.read_text()
    exact = "m = FMA(g, c2, m * beta2);"
    assert exact in text
    broken = tmp_path / "lion.c"
    broken.write_text(text.replace(exact, "m = m * beta2 + g * c2;"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.warns(native.NativeKernelWarning, match="self-check"):
        assert native.load_library(broken, SIGNATURES, extra=("-lm",), check=c_kernel_matches_composite) is None
    assert "self-check" in (native.unavailable_reason(broken) or "")
