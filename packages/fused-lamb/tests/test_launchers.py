"""The launchers on flat slices: the torch-ops composites against the per-tensor references (Lamb
bit for bit in fp32), the C kernel against the composite, the shared machinery of
:mod:`fused_lamb.layerwise`, and that no launcher loops over parameters (20,000 of them step in
well under a second)."""

from __future__ import annotations

import time

import pytest
import torch

from fused_core import native
from fused_core.kernels import GradSegments, RunInfo
from fused_core.reductions import segment_norms
from fused_lamb import FusedLamb, c_kernel
from fused_lamb.adamp_kernels import adamp_composite
from fused_lamb.lamb_kernels import c_library, lamb_c_flat, lamb_c_segments, lamb_composite
from fused_lamb.layerwise import Channels, expand, in_fp32_runs
from fused_lamb.reference import AdamP, Lamb

SHAPES = [(33,), (16, 8), (), (0,), (1027,), (5, 4, 3), (7,)]
LAMB_HP = dict(
    lr=1e-2, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, adam_w_mode=True,
    grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False, adam=False, max_weight_norm=None,
)  # fmt: skip
LAMB_CASES = {
    "apex_defaults": {},
    "l2_nvlamb_clamped": dict(adam_w_mode=False, use_nvlamb=True, max_weight_norm=3.0, grad_averaging=False),
    "no_bias_correction_unclipped": dict(bias_correction=False, max_grad_norm=None, weight_decay=0.0),
    "adam": dict(adam=True, max_grad_norm=None),
}
ADAMP_HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=1e3, wd_ratio=0.1, nesterov=False)
needs_c = pytest.mark.skipif(
    c_library() is None, reason=f"no C Lamb kernel: {native.unavailable_reason(c_kernel.C_SOURCE)}"
)


def seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))


class FlatRun:
    """Parameters of ``shapes`` in one flat buffer (``gap`` zeros after each, as alignment leaves),
    with gradient and state slices and the launcher's RunInfo."""

    def __init__(self, shapes, dtype, generator, gap=0, moments=("exp_avg", "exp_avg_sq")):
        self.generator = generator
        numels = [torch.Size(shape).numel() for shape in shapes]
        offsets = [sum(numels[:i]) + gap * i for i in range(len(shapes))]
        length = offsets[-1] + numels[-1] + gap
        self.params = torch.zeros(length, dtype=dtype)
        self.grads = torch.zeros(length, dtype=dtype)
        self.parameters = tuple(
            self.params[o : o + n].view(shape) for o, n, shape in zip(offsets, numels, shapes)
        )  # fmt: skip
        for p in self.parameters:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
        self.offsets, self.numels = torch.tensor(offsets), torch.tensor(numels)
        self.state = {name: torch.zeros_like(self.params) for name in moments}
        self.state["step"] = torch.zeros(len(shapes))

    def run(self, first_step: bool) -> RunInfo:
        return RunInfo(first_step, self.parameters, self.offsets, self.numels)

    def new_grads(self) -> list[torch.Tensor]:
        """Fresh random gradients in the flat slice; returns them per parameter (copies)."""
        values = []
        for offset, numel, p in zip(self.offsets.tolist(), self.numels.tolist(), self.parameters):
            value = torch.randn(p.shape, generator=self.generator, dtype=torch.float64).to(p.dtype)
            self.grads[offset : offset + numel] = value.flatten()
            values.append(value)
        return values

    def copy(self) -> FlatRun:
        other = object.__new__(FlatRun)
        other.generator = self.generator
        other.params, other.grads = self.params.clone(), self.grads.clone()
        places = zip(self.offsets.tolist(), self.numels.tolist(), self.parameters)
        other.parameters = tuple(other.params[o : o + n].view(p.shape) for o, n, p in places)
        other.offsets, other.numels = self.offsets, self.numels
        other.state = {name: value.clone() for name, value in self.state.items()}
        return other


def step_against_reference(launcher, reference_cls, hp, dtype, *, exact, steps=4, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed())
    flat = FlatRun(shapes, dtype, generator)
    ref_params = [torch.nn.Parameter(p.clone()) for p in flat.parameters]
    reference = reference_cls(ref_params, **hp)
    for step in range(steps):
        for p, g in zip(ref_params, flat.new_grads()):
            p.grad = g
        values = {"global_grad_norm": reference.global_grad_norm()} if reference_cls is Lamb else {}
        reference.step()
        launcher(flat.params, flat.grads, flat.state, {**hp, **values}, flat.run(step == 0))
        for index, (p, ref) in enumerate(zip(flat.parameters, ref_params)):
            if exact:
                assert torch.equal(p, ref), f"step {step + 1}, parameter {index}"
            else:
                scale = float(ref.detach().abs().amax()) if ref.numel() else 0.0
                torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_composite_is_the_reference_bit_for_bit_in_fp32(case: str) -> None:
    """The composite does the reference's elementwise ops in its order, and both sum the norms in
    fp64 before rounding them to fp32; the global norm is the reference's, given as a step value."""
    step_against_reference(lamb_composite, Lamb, {**LAMB_HP, **LAMB_CASES[case]}, torch.float32, exact=True)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_composite_matches_the_reference(nesterov: bool) -> None:
    """Projected channel-wise (delta 1e3): the rows are summed in another order than the reference's."""
    step_against_reference(adamp_composite, AdamP, dict(ADAMP_HP, nesterov=nesterov), torch.float32, exact=False)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_c_kernel_agrees_with_the_composite(case: str, dtype: torch.dtype) -> None:
    """The flat C launcher against the composite over several slots (one larger than the kernel's
    pieces of 32,768 elements), to a few ulps of the dtype: its sqrt and sums are its own."""
    hp = {**LAMB_HP, **LAMB_CASES[case], "global_grad_norm": torch.tensor(50.0)}
    composite = FlatRun([*SHAPES, (300, 250)], dtype, torch.Generator().manual_seed(seed()))
    c = composite.copy()
    for step in range(3):
        composite.new_grads()
        c.grads.copy_(composite.grads)
        lamb_composite(composite.params, composite.grads, composite.state, hp, composite.run(step == 0))
        lamb_c_flat(c.params, c.grads, c.state, hp, c.run(step == 0))
        tolerance = 8 * torch.finfo(dtype).eps
        for name, expected in [("params", composite.params), *composite.state.items()]:
            actual = c.params if name == "params" else c.state[name]
            scale = float(expected.double().abs().max())
            assert float((actual.double() - expected.double()).abs().max()) <= tolerance * scale, (step, name)


@needs_c
def test_c_segment_launcher_reads_gradients_where_they_lie() -> None:
    """Slots without a gradient are skipped, slots whose state starts are zeroed and marked 2, and
    each slot steps with its own count: as the composite run over each slot alone."""
    generator = torch.Generator().manual_seed(seed())
    hp = {**LAMB_HP, "max_grad_norm": None}
    flat = FlatRun([(40,), (6, 7), (50_000,), (9,)], torch.float32, generator)
    flat.state["exp_avg"].normal_(generator=generator)
    flat.state["exp_avg_sq"].normal_(generator=generator).abs_()
    flat.state["step"].copy_(torch.tensor([3.0, 0.0, 7.0, 2.0]))
    grads = [torch.randn(p.shape, generator=generator) for p in flat.parameters]
    has_grad, initialized = [1, 1, 1, 0], [1, 0, 1, 1]
    expected = flat.copy()
    segments = GradSegments(
        ptrs=torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64),
        has_grad=torch.tensor(has_grad, dtype=torch.int8),
        offsets=flat.offsets,
        numels=flat.numels,
        initialized=torch.tensor(initialized, dtype=torch.uint8),
    )
    assert lamb_c_segments(flat.params, flat.state, segments, hp) == 1
    assert segments.initialized.tolist() == [1, 2, 1, 1]
    for index, (offset, numel) in enumerate(zip(flat.offsets.tolist(), flat.numels.tolist())):
        part = slice(offset, offset + numel)
        state = {name: expected.state[name][part] for name in ("exp_avg", "exp_avg_sq")}
        state["step"] = expected.state["step"][index : index + 1]
        if has_grad[index]:
            one = RunInfo(
                not initialized[index],
                (expected.parameters[index],),
                torch.zeros(1, dtype=torch.int64),
                flat.numels[index : index + 1],
            )
            lamb_composite(expected.params[part], grads[index].flatten(), state, hp, one)  # fmt: skip
        torch.testing.assert_close(flat.params[part], expected.params[part], rtol=1e-6, atol=1e-6)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(flat.state[name][part], state[name], rtol=1e-6, atol=1e-7)
    assert flat.state["step"].tolist() == [4.0, 1.0, 8.0, 2.0]


def test_in_fp32_runs_rounds_once_a_few_whole_slots_at_a_time() -> None:
    """bf16 through pieces of whole slots (a tiny chunk here) gives the bits of the fp32 update of
    the whole run, rounded once; the update sees every piece's slots whole (a per-slot norm)."""
    generator = torch.Generator().manual_seed(seed())
    shapes = [(30,), (5, 9), (200,), (3,), (0,), (70,)]
    flat = FlatRun(shapes, torch.bfloat16, generator, moments=("exp_avg",))
    flat.new_grads()
    flat.state["exp_avg"].normal_(generator=generator)

    def update(p, g, state, run):
        norms = segment_norms(g, run.offsets, run.numels)
        state[0].mul_(0.9).add_(g)
        p.sub_(state[0] * expand(norms, run, p.numel()) * 1e-2)

    wide = [flat.params.float(), flat.grads.float(), [flat.state["exp_avg"].float()]]
    update(*wide, flat.run(False))
    in_fp32_runs(update, flat.params, flat.grads, [flat.state["exp_avg"]], flat.run(False), chunk=64)
    assert torch.equal(flat.params, wide[0].bfloat16())
    assert torch.equal(flat.state["exp_avg"], wide[2][0].bfloat16())


def layouts(generator):
    """A matrix, a transposed one, a channels_last conv weight, a 3-d tensor whose rows are scattered
    in memory, a bias, a 0-dim scalar, an empty matrix and a one-row matrix (float64)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    conv = randn(6, 3, 3, 3).to(memory_format=torch.channels_last)
    scattered = randn(4, 5, 6).permute(1, 0, 2).contiguous().permute(1, 0, 2)
    return [randn(12, 20), randn(20, 12).t(), conv, scattered, randn(12), randn(()), randn(4, 0), randn(1, 7)]


@pytest.mark.parametrize("gap", [0, 3])
def test_channels_read_rows_in_any_memory_layout(gap: int) -> None:
    """Per-row sums and the expansion of per-row values, for parameters laid out in their memory
    order with alignment gaps between them, against ``reshape(size(0), -1)`` per parameter."""
    generator = torch.Generator().manual_seed(seed())
    tensors = layouts(generator)
    numels = [t.numel() for t in tensors]
    offsets = [sum(numels[:i]) + gap * i for i in range(len(tensors))]
    length = offsets[-1] + numels[-1] + gap
    x, y = torch.zeros(length, dtype=torch.float64), torch.zeros(length, dtype=torch.float64)
    parameters = []
    for t, offset, numel in zip(tensors, offsets, numels):
        view = x[offset : offset + numel].as_strided(t.shape, t.stride(), offset)
        view.copy_(t)
        y[offset : offset + numel].as_strided(t.shape, t.stride(), offset).copy_(t * 2 + 1)
        parameters.append(view)
    channels = Channels(
        RunInfo(False, tuple(parameters), torch.tensor(offsets), torch.tensor(numels)), length, x.device
    )
    expected_dot, expected_rows = [], []
    for p in parameters:
        rows = p.reshape(p.size(0), -1) if p.dim() > 1 and p.numel() else p.reshape(1, -1)
        expected_dot.append((rows * (rows * 2 + 1)).sum(1))
        expected_rows.append(rows.size(0))
    torch.testing.assert_close(channels.sums(x, y), torch.cat(expected_dot), rtol=1e-12, atol=1e-12)
    assert channels.rows.tolist() == expected_rows
    assert channels.matrix.tolist() == [True, True, True, True, False, False, False, True]
    values = torch.arange(channels.channels, dtype=torch.float64) + 1
    expanded = channels.expand(values, gap=-1.0)
    first = 0
    for p, offset, rows in zip(parameters, offsets, expected_rows):
        view = expanded[offset : offset + p.numel()].as_strided(p.shape, p.stride(), offset)
        by_rows = view.reshape(rows, -1)
        assert torch.equal(by_rows, values[first : first + rows].unsqueeze(1).expand_as(by_rows))
        first += rows
    covered = torch.zeros(length, dtype=torch.bool)
    for offset, numel in zip(offsets, numels):
        covered[offset : offset + numel] = True
    assert bool((expanded[~covered] == -1.0).all())


def best_of(steps, call) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def test_20000_parameters_step_in_well_under_a_second() -> None:
    """Per-parameter norms from one reduction per run, never a Python loop over parameters:
    FusedLamb on 20,000 x 64 (a loop of torch ops per parameter takes seconds), and AdamP's
    launcher on 20,000 8x8 matrices (per-row sums, per-row projection; ~0.1 s on two busy cores,
    where a loop of torch ops per parameter takes several seconds)."""
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(20_000)]
    for p in params:
        p.grad = torch.randn(64)
    optimizer = FusedLamb(params, lr=1e-3)
    optimizer.step()
    assert best_of(3, optimizer.step) < 0.5
    flat = FlatRun([(8, 8)] * 20_000, torch.float32, torch.Generator().manual_seed(seed()))
    flat.new_grads()
    adamp_composite(flat.params, flat.grads, flat.state, ADAMP_HP, flat.run(True))
    assert best_of(3, lambda: adamp_composite(flat.params, flat.grads, flat.state, ADAMP_HP, flat.run(False))) < 1.0
