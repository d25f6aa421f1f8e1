"""The torch-ops composites (:mod:`fused_rmsprop.kernels`), which serve every device but the CPU (and
the CPU where the C kernel is not built), on flat runs of several parameters, against torch.

* fp32 and fp64: torch.optim.RMSprop / Adadelta(foreach=False) and the reference RMSpropTF, bit for
  bit, parameters, state and step counts, over several steps; the state starts as NaN (a first step
  must not read it).
* bf16 and fp16: the reference in fp32 on upcast copies, rounded to the dtype after every step.
* Alignment gaps between parameters (as on CUDA and the NPU) hold zeros and keep them, state
  included: RMSpropTF's ``square_avg`` starts at one in the parameters only.
"""

from __future__ import annotations

import pytest
import torch

from fused_core.kernels import RunInfo, same_bits
from fused_rmsprop.kernels import adadelta_composite, low_precision_sqrt, rmsprop_composite, rmsprop_tf_composite
from fused_rmsprop.reference import RMSpropTF
from fused_testing.roots import fp32_sqrt_replaced

SIZES = (1, 7, 33, 4099)
STEPS = 3
CASES = {
    "rmsprop-centered_momentum_wd_maximize": (
        rmsprop_composite,
        torch.optim.RMSprop,
        dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1, maximize=True),
    ),
    "rmsprop-plain_tensor_lr": (rmsprop_composite, torch.optim.RMSprop, dict(lr=torch.tensor(1e-2), alpha=0.3)),
    "rmsprop_tf-centered_decoupled_momentum": (
        rmsprop_tf_composite,
        RMSpropTF,
        dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1, decoupled_decay=True),
    ),
    "rmsprop_tf-l2_momentum_torch_maximize": (
        rmsprop_tf_composite,
        RMSpropTF,
        dict(lr=1e-2, momentum=0.5, weight_decay=0.1, lr_in_momentum=False, maximize=True),
    ),
    "adadelta-wd_maximize_tensor_lr": (
        adadelta_composite,
        torch.optim.Adadelta,
        dict(lr=torch.tensor(0.5), rho=0.8, weight_decay=0.1, maximize=True),
    ),
}
STATE = ("square_avg", "momentum_buffer", "grad_avg", "acc_delta")


def run(name: str, dtype: torch.dtype, gap: int = 0) -> tuple[list, dict, list, torch.optim.Optimizer, torch.Tensor]:
    """The composite over one run of SIZES parameters (``gap`` zeros between them) and the reference
    over the same parameters, STEPS steps; returns the composite's pieces and state, the reference's
    parameters and optimizer, and the flat parameters."""
    composite, reference, config = CASES[name]
    low = dtype in (torch.float16, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(n, generator=generator, dtype=torch.float64).to(dtype) for n in SIZES]
    offsets = torch.tensor([sum(SIZES[:i]) + gap * i for i in range(len(SIZES))], dtype=torch.int64)
    numels = torch.tensor(SIZES, dtype=torch.int64)
    flat = torch.zeros(sum(SIZES) + gap * (len(SIZES) - 1), dtype=dtype)
    pieces = [flat[o : o + n] for o, n in zip(offsets.tolist(), SIZES)]
    for piece, value in zip(pieces, values):
        piece.copy_(value)
    state = {key: torch.full_like(flat, float("nan")) for key in STATE}
    state["step"] = torch.full((len(SIZES),), float("nan"))
    hp = dict(reference([torch.nn.Parameter(torch.zeros(1))], **config).param_groups[0])
    leaves = [(v.float() if low else v.clone()).requires_grad_() for v in values]
    optimizer = reference(leaves, foreach=False, **config)
    with fp32_sqrt_replaced(
        low_precision_sqrt(dtype) if low else None
    ):  # the reference's fp32 arithmetic is the fp16/bf16 updates'
        for step in range(STEPS):
            grads = [torch.randn(n, generator=generator, dtype=torch.float64).to(dtype) for n in SIZES]
            flat_grads = torch.zeros_like(flat)
            for o, n, g in zip(offsets.tolist(), SIZES, grads):
                flat_grads[o : o + n].copy_(g)
            info = RunInfo(first_step=step == 0, parameters=tuple(pieces), offsets=offsets, numels=numels)
            composite(flat, flat_grads, state, hp, info)
            for leaf, g in zip(leaves, grads):
                leaf.grad = g.float() if low else g.clone()
            optimizer.step()
            if low:  # the composite's one rounding per step
                with torch.no_grad():
                    for leaf in leaves:
                        for tensor in (leaf, *optimizer.state[leaf].values()):
                            if tensor.dim() > 0:
                                tensor.copy_(tensor.to(dtype).float())
    return pieces, state, leaves, optimizer, flat


def assert_matches(name: str, dtype: torch.dtype, gap: int = 0) -> tuple[dict, torch.Tensor]:
    pieces, state, leaves, optimizer, flat = run(name, dtype, gap)
    offsets = [sum(SIZES[:i]) + gap * i for i in range(len(SIZES))]
    for slot, (piece, leaf) in enumerate(zip(pieces, leaves)):
        assert same_bits(piece, leaf.detach().to(dtype)), f"{name} {dtype}: parameter {slot}"
        for key, value in optimizer.state[leaf].items():
            mine = (
                state[key][slot : slot + 1]
                if key == "step"
                else state[key][offsets[slot] : offsets[slot] + piece.numel()]
            )
            theirs = value.reshape(1) if key == "step" else value.to(dtype)
            assert same_bits(mine, theirs), f"{name} {dtype}: {key} of parameter {slot}"
    return state, flat


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_composite_is_the_reference(name: str, dtype: torch.dtype) -> None:
    """fp32/fp64 bit for bit; fp16/bf16 the fp32 reference rounded once per step, bit for bit."""
    assert_matches(name, dtype)


@pytest.mark.parametrize("name", CASES)
def test_alignment_gaps_stay_zero(name: str) -> None:
    """Gaps of 3 zeros between the parameters: the parameters still step as the reference's, and the
    gaps of the parameters and every state buffer used are zeros after every step."""
    state, flat = assert_matches(name, torch.float32, gap=3)
    gaps = torch.ones_like(flat, dtype=torch.bool)
    for o, n in zip([sum(SIZES[:i]) + 3 * i for i in range(len(SIZES))], SIZES):
        gaps[o : o + n] = False
    used = [key for key in STATE if not state[key].isnan().all()]
    for tensor, what in [(flat, "param"), *((state[key], key) for key in used)]:
        assert torch.equal(tensor[gaps], torch.zeros(int(gaps.sum()))), what
