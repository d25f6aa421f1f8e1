"""torch_npu's fused extras on FusedSGD, and the sparse-gradient error.

``clip_grad_norm_fused_`` against ``torch.nn.utils.clip_grad_norm_`` on an identical
model; ``get_combined_params/grads/state`` against the tensors they claim to hold;
a sparse gradient is refused with an error naming the parameter, nothing modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_core import InvalidParameterError, grad_norm
from fused_sgd import FusedSGD
from fused_testing.native import require_library
from fused_testing.parity import make_batches, make_model
from fused_testing.reference import relative_error

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


class Branchy(nn.Module):
    """``make_model(kind)`` with a layer used only on the steps the caller chooses."""

    def __init__(self, kind: str = "mlp", seed: int = 0) -> None:
        super().__init__()
        model = make_model(kind, seed=seed)
        self.head, self.tail = model[:-1], model[-1:]
        width = self.tail[0].in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.branch = nn.Linear(width, width)

    def forward(self, x: Tensor, use_branch: bool = True) -> Tensor:
        h = self.head(x)
        if use_branch:
            h = h + self.branch(h)
        return self.tail(h)


def backward(model: nn.Module, batch: tuple[Tensor, Tensor], **kwargs: bool) -> None:
    inputs, targets = batch
    F.cross_entropy(model(inputs, **kwargs), targets).backward()


# ----- clip_grad_norm_fused_ ------------------------------------------------------
NORM_TYPES = [2.0, 1.0, math.inf]
CLIP_RTOL = {2.0: 1e-6, math.inf: 1e-6, 1.0: 1e-5}
"""Against torch, for the same gradients. The L1 norm gets 1e-5: in float32 on the CPU,
torch's own L1 norm of these models is 1e-6..2.5e-6 off the float64 value (ours up to 5e-6),
so no float32 implementation can promise 1e-6 agreement with it."""


def torch_clip(grads: list[Tensor | None], max_norm: float, norm_type: float) -> tuple[Tensor, list[Tensor | None]]:
    """torch.nn.utils.clip_grad_norm_ on copies of ``grads``: (total norm, clipped copies)."""
    holders = []
    for grad in grads:
        holder = nn.Parameter(torch.empty(0) if grad is None else torch.empty_like(grad))
        holder.grad = None if grad is None else grad.clone()
        holders.append(holder)
    norm = torch.nn.utils.clip_grad_norm_(holders, max_norm, norm_type)
    return norm, [holder.grad for holder in holders]


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_clip_grad_norm_matches_torch(kind: str, norm_type: float) -> None:
    """At every step, our norm and clipped gradients are torch's for the same gradients:
    before the first step and after several, clipping (steps 0, 3) or not (1, 2), with a
    layer that has no gradient on the odd steps (its stale values must not count).
    Training with clipping then matches torch."""
    ours_model, torch_model = Branchy(kind), Branchy(kind)
    ours = FusedSGD(ours_model.parameters(), **HP)
    reference = torch.optim.SGD(torch_model.parameters(), foreach=False, **HP)
    for step, batch in enumerate(make_batches(kind, 4, seed=5)):
        use_branch, clips = step % 2 == 0, step in (0, 3)
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            optimizer.zero_grad(set_to_none=True)
            backward(model, batch, use_branch=use_branch)
        grads = [p.grad.clone() if p.grad is not None else None for p in ours_model.parameters()]
        total = torch.nn.utils.get_total_norm([g for g in grads if g is not None], norm_type)
        max_norm = total.item() * (0.25 if clips else 4.0)
        expected_norm, expected_grads = torch_clip(grads, max_norm, norm_type)

        norm = ours.clip_grad_norm_fused_(max_norm, norm_type)
        assert relative_error(norm, expected_norm) <= CLIP_RTOL[norm_type]
        for (name, p), expected, before in zip(ours_model.named_parameters(), expected_grads, grads):
            assert (p.grad is None) == (expected is None), name
            if expected is not None:
                assert relative_error(p.grad, expected) <= CLIP_RTOL[norm_type], name
                assert torch.equal(p.grad, before) != clips, name  # clipping happened exactly when expected
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), max_norm, norm_type)
        ours.step()
        reference.step()
    for (name, p), q in zip(ours_model.named_parameters(), torch_model.parameters()):
        assert relative_error(p, q) <= 1e-5, name


def test_clip_grad_norm_with_default_zero_grad() -> None:
    """With zero_grad(set_to_none=False) the gradients stay bound to the flat buffer:
    clipping through it must be what p.grad shows, and training matches torch."""
    ours_model, torch_model = make_model("deep-mlp"), make_model("deep-mlp")
    ours = FusedSGD(ours_model.parameters(), **HP)
    reference = torch.optim.SGD(torch_model.parameters(), foreach=False, **HP)
    for batch in make_batches("deep-mlp", 6, seed=8):
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            optimizer.zero_grad(set_to_none=False)
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        norm = ours.clip_grad_norm_fused_(0.05)
        expected = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.05)
        assert expected > 0.05  # clipping really happens
        assert relative_error(norm, expected) <= CLIP_RTOL[2.0]
        ours.step()
        reference.step()
    for (name, p), q in zip(ours_model.named_parameters(), torch_model.parameters()):
        assert relative_error(p, q) <= 1e-5, name


CLIP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLIP_SHAPES = [(300_007,), (512, 129), (7, 11)]
"""Realistic sizes: more than one 65,536-element piece of the C kernels, so their threads split
the work, and odd lengths for the vector tails."""


@pytest.fixture(params=["c-kernel", "c-kernel-flat", "torch-ops"])
def norm_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the C kernels of fused_core.grad_norm (which must load wherever a C
    compiler is, as on CI: fused_testing.native.require_library) reading the gradients where they
    lie, again with the gradients bound to the flat buffer first, and through the torch-op fallback."""
    if request.param.startswith("c-kernel"):
        require_library(grad_norm.library(), grad_norm.SOURCE)
    if request.param != "c-kernel":
        monkeypatch.setattr(grad_norm, "segments_serve", lambda device, dtype, norm_type: False)
    if request.param == "torch-ops":
        monkeypatch.setattr(grad_norm, "_native", lambda flat: None)
    return request.param


def _clip_setup(dtype: torch.dtype, seed: int, scale: float = 1.0) -> tuple[list[Tensor], FusedSGD, list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape in CLIP_SHAPES]
    grads = [(torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype) for shape in CLIP_SHAPES]
    optimizer = FusedSGD(params, lr=0.1)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()  # builds the flat buffers; lr * grad moved the params, not the grads
    return params, optimizer, grads


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
@pytest.mark.parametrize("dtype", CLIP_DTYPES, ids=str)
def test_clip_grad_norm_in_every_dtype_against_float64(dtype: torch.dtype, norm_type: float, norm_path: str) -> None:
    """fp32/bf16/fp16 gradients: the norm is the float64 norm of the same values (rounded to the
    gradients' dtype, as torch returns it) and each clipped gradient is the float64 product within
    2 ulps (the product's rounding, and the coefficient's, which is computed in fp32 as torch's is)
    plus the norm's own error; no further from float64 than torch's own clip_grad_norm_."""
    params, optimizer, grads = _clip_setup(dtype, seed=31)
    exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]), norm_type)
    max_norm = float(exact) / 3
    torch_norm, torch_grads = torch_clip(grads, max_norm, norm_type)

    norm = optimizer.clip_grad_norm_fused_(max_norm, norm_type)

    eps = torch.finfo(dtype).eps
    assert norm.dtype == dtype
    if norm_path.startswith("c-kernel"):  # fp64 sum of squares: only the final rounding to dtype
        assert relative_error(norm, exact) <= eps / 2
    else:  # fp32 chunk norms, as torch's own norm
        assert relative_error(norm, exact) <= relative_error(torch_norm, exact) + 8 * eps
    coefficient = max_norm / (float(exact) + 1e-6)
    for p, g, theirs in zip(params, grads, torch_grads):
        expected = g.double() * coefficient
        ours_error = relative_error(p.grad, expected)
        assert ours_error <= 2 * eps + relative_error(norm, exact), (dtype, p.shape, ours_error)
        assert ours_error <= relative_error(theirs, expected) + eps / 4


@pytest.mark.parametrize("dtype", CLIP_DTYPES, ids=str)
def test_clip_below_max_norm_leaves_gradients_bitwise(dtype: torch.dtype, norm_path: str) -> None:
    """A coefficient of 1 leaves every gradient as it was, bit for bit (torch multiplies by 1.0)."""
    params, optimizer, grads = _clip_setup(dtype, seed=32)
    optimizer.clip_grad_norm_fused_(1e9)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
@pytest.mark.parametrize("dtype", CLIP_DTYPES, ids=str)
def test_clip_non_finite_gradient_like_torch(dtype: torch.dtype, norm_type: float, bad: float, norm_path: str) -> None:
    """One inf or NaN element anywhere: the norm is torch's (inf or NaN), error_if_nonfinite raises
    before anything is scaled, and without it the gradients are scaled exactly as torch scales them."""
    params, optimizer, grads = _clip_setup(dtype, seed=33)
    grads[0][123_457] = bad
    params[0].grad[123_457] = bad
    torch_norm, torch_grads = torch_clip(grads, 1.0, norm_type)
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.clip_grad_norm_fused_(1.0, norm_type, error_if_nonfinite=True)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())
    norm = optimizer.clip_grad_norm_fused_(1.0, norm_type)
    assert torch.equal(norm.isnan(), torch_norm.isnan()) and torch.equal(norm.isinf(), torch_norm.isinf())
    for p, theirs in zip(params, torch_grads):
        assert torch.equal(p.grad.isnan(), theirs.isnan())


def test_clip_fp32_gradients_whose_squares_overflow(norm_path: str) -> None:
    """fp32 gradients near 1e20: their squares overflow fp32. torch's own clip_grad_norm_ returns
    inf here and zeroes every gradient; both of our paths (the C kernel, and torch ops accumulating
    the chunk norms in fp64) give the float64 norm and scale by it (docs/migration.md)."""
    params, optimizer, grads = _clip_setup(torch.float32, seed=34, scale=1e20)
    exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
    torch_norm, _ = torch_clip(grads, 1.0, 2.0)
    assert torch.isinf(torch_norm)  # what torch does, for the record
    norm = optimizer.clip_grad_norm_fused_(1.0)
    assert relative_error(norm, exact) <= 1e-6
    for p, g in zip(params, grads):
        assert relative_error(p.grad, g.double() / float(exact)) <= 1e-6


# ----- combined buffers -------------------------------------------------------------
def _slot_views(optimizer: FusedSGD, flats: list[Tensor]) -> list[tuple[Tensor, object]]:
    """Each parameter's region of its bucket's flat buffer, shaped and strided like it."""
    views = []
    for bucket, flat in zip(optimizer._layout.buckets, flats, strict=True):
        assert flat.dim() == 1 and flat.is_contiguous() and flat.dtype == bucket.plan.dtype
        for slot in bucket.plan.slots:
            views.append((flat.as_strided(slot.shape, slot.stride, flat.storage_offset() + slot.offset), slot))
    return views


def _assert_flat_holds(flats: list[Tensor], tensors: list[Tensor]) -> None:
    """Same multiset of values: every element of the flat buffers belongs to exactly one tensor."""
    ours = torch.sort(torch.cat([flat.reshape(-1) for flat in flats])).values
    theirs = torch.sort(torch.cat([t.reshape(-1) for t in tensors])).values
    assert torch.equal(ours, theirs)


def test_combined_params_grads_and_state() -> None:
    ours_model, torch_model = Branchy("convnet"), Branchy("convnet")
    ours = FusedSGD(ours_model.named_parameters(), **HP)
    reference = torch.optim.SGD(torch_model.parameters(), foreach=False, **HP)
    batches = make_batches("convnet", 4, seed=3)
    for step, batch in enumerate(batches):
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            optimizer.zero_grad(set_to_none=True)
            backward(model, batch, use_branch=step < 3)
        if step < 3:
            ours.step()
            reference.step()
    # step 3: the branch has no gradient, the rest have fresh (not yet adopted) ones
    params, grads = ours.get_combined_params(), ours.get_combined_grads()
    momentum = ours.get_combined_state("momentum_buffer")
    assert len(params) == len(grads) == len(momentum) == 1  # one (cpu, float32) bucket
    assert params[0].numel() == sum(p.numel() for p in ours_model.parameters())
    assert ours_model.head[3].weight.is_contiguous(memory_format=torch.channels_last)  # strides kept

    _assert_flat_holds(params, list(ours_model.parameters()))
    branch = set(ours_model.branch.parameters())
    live_grads = [p.grad for p in ours_model.parameters() if p.grad is not None]
    _assert_flat_holds(grads, live_grads + [torch.zeros_like(p) for p in branch])  # gradless slots hold zeros
    _assert_flat_holds(momentum, [ours.state[p]["momentum_buffer"] for p in ours_model.parameters()])

    torch_params = dict(zip(ours_model.parameters(), torch_model.parameters()))
    for view, slot in _slot_views(ours, params):
        p = slot.param
        assert torch.equal(view, p) and view.stride() == p.stride()
        assert p.data_ptr() == view.data_ptr()  # the parameter lives in the flat buffer
        assert relative_error(view, torch_params[p]) <= 1e-5
    for view, slot in _slot_views(ours, grads):
        p = slot.param
        if p in branch:
            assert p.grad is None and torch.count_nonzero(view) == 0
        else:
            assert torch.equal(view, p.grad) and p.grad.data_ptr() == view.data_ptr()
            assert relative_error(view, torch_params[p].grad) <= 1e-5
    for view, slot in _slot_views(ours, momentum):
        buffer = ours.state[slot.param]["momentum_buffer"]
        assert torch.equal(view, buffer) and buffer.data_ptr() == view.data_ptr()
        assert relative_error(view, reference.state[torch_params[slot.param]]["momentum_buffer"]) <= 1e-5

    # the flat buffers are live: writing through them is what the parameters see
    with torch.no_grad():
        params[0].mul_(2.0)
    for p, q in torch_params.items():
        assert relative_error(p, 2.0 * q) <= 1e-5


def test_combined_buffers_per_dtype() -> None:
    params = [
        nn.Parameter(torch.randn(5, 7)),
        nn.Parameter(torch.randn(33, dtype=torch.float16)),
        nn.Parameter(torch.randn(4, 3).t()),  # transposed: keeps its strides
        nn.Parameter(torch.randn(9, dtype=torch.bfloat16)),
        nn.Parameter(torch.randn(3, dtype=torch.float16)),
    ]
    ours = FusedSGD(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    flats = ours.get_combined_params()
    assert sorted(str(flat.dtype) for flat in flats) == ["torch.bfloat16", "torch.float16", "torch.float32"]
    for flat, grads in zip(flats, ours.get_combined_grads()):
        _assert_flat_holds([flat], [p for p in params if p.dtype == flat.dtype])
        _assert_flat_holds([grads], [p.grad for p in params if p.dtype == flat.dtype])
    assert params[2].stride() == (1, 3)


# ----- sparse gradients ---------------------------------------------------------------
class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embedding = nn.Embedding(20, 16, sparse=True)
            self.dense = nn.Linear(16, 16)
            self.out = nn.Linear(16, 10)

    def forward(self, tokens: Tensor, use_embedding: bool = True) -> Tensor:
        h = self.embedding(tokens).mean(1) if use_embedding else torch.ones(tokens.shape[0], 16)
        return self.out(torch.relu(self.dense(h)))


def _embedding_loss(model: WithEmbedding, step: int, use_embedding: bool = True) -> None:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 20, (8, 5), generator=generator)
    targets = torch.randint(0, 10, (8,), generator=generator)
    F.cross_entropy(model(tokens, use_embedding), targets).backward()


PARAMS: dict[str, Callable[[nn.Module], object]] = {
    "named_parameters": lambda model: model.named_parameters(),
    "parameters": lambda model: model.parameters(),
}
NAMED_AS = {"named_parameters": "'embedding.weight'", "parameters": "param group 0, index 0"}


@pytest.mark.parametrize("source", sorted(PARAMS))
def test_sparse_gradient_on_the_first_step(source: str) -> None:
    model = WithEmbedding()
    optimizer = FusedSGD(PARAMS[source](model), **HP)
    before = [p.detach().clone() for p in model.parameters()]
    _embedding_loss(model, 0)
    assert model.embedding.weight.grad.is_sparse
    with pytest.raises(InvalidParameterError, match="sparse") as error:
        optimizer.step()
    assert NAMED_AS[source] in str(error.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(optimizer.state_dict()["state"]) == 0
