"""Parameters whose memory is shared, aliased, swapped, strided or resized, against torch.optim.SGD.

Each scenario runs on a model and on its deep copy, FusedSGD on the first and
``torch.optim.SGD(foreach=False)`` (the oracle) on the second, with fresh random batches
drawn from a seed chosen at random for each test (printed in every assertion message;
``FUSED_OPTIM_TEST_SEED=<seed>`` replays one). After every step every parameter and
momentum buffer is compared: in fp32 bit for bit, each model computing its own gradients;
in fp16/bf16 both step with the gradients of torch's model (FusedSGD computes in fp32 and
rounds once, torch rounds after every operation: with each model's own gradients that
difference would feed back through the forward pass and compound), within
``(step + 2)`` eps relative to the largest magnitude (worst seen: half of that).

What is refused (shared memory, overlapping parameters) must raise
``fused_core.InvalidParameterError`` (a ``ValueError``) naming the parameter(s), and
leave every parameter, gradient and momentum buffer as it was (values, storage and
identity), so that the error can be caught and training continued.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_core import InvalidParameterError
from fused_sgd import FusedSGD
from fused_testing.reference import relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(dtype).removeprefix("torch.") for dtype in DTYPES]
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
ULPS_PER_STEP = 1
NOT_RESIZABLE = "Trying to resize storage that is not resizable"

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
naming = pytest.mark.parametrize("named", [True, False], ids=["named_parameters", "parameters"])


def draw_seed() -> int:
    """A fresh seed per test (``FUSED_OPTIM_TEST_SEED`` replays one), independent of torch's RNG."""
    fixed = os.environ.get("FUSED_OPTIM_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**31)


# ----- models ---------------------------------------------------------------------
def mlp() -> nn.Sequential:
    """Four 512-wide hidden layers (about 0.9 M parameters): layers 2, 4 and 6 are 512 x 512."""
    return nn.Sequential(
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def mlp_batch(generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.randn(64, 256, generator=generator).to(dtype), torch.randint(0, 10, (64,), generator=generator)


def convnet() -> nn.Sequential:
    """Three 3x3 convolutions with BatchNorm and a classifier (about 60 k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def image_batch(generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    images = torch.randn(16, 3, 16, 16, generator=generator).to(dtype)
    return images.contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (16,), generator=generator)


class TwoHeads(nn.Module):
    """A trunk and two classifier heads whose weights are views of one tensor (``split`` makes them).

    Built in ``dtype`` (``.to(dtype)`` would give each head its own storage), and deep-copied
    with the heads still views of one tensor (``Parameter.__deepcopy__`` clones each alone).
    """

    def __init__(self, split: Callable[[Tensor], tuple[Tensor, Tensor]], dtype: torch.dtype) -> None:
        super().__init__()
        self.split = split
        self.trunk = nn.Linear(256, 512, dtype=dtype)
        heads = (torch.randn(20, 512) / 512**0.5).to(dtype)
        first, second = split(heads)
        self.first = nn.Parameter(first)
        self.second = nn.Parameter(second)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = torch.relu(self.trunk(inputs))
        return hidden @ self.first.t() + hidden @ self.second.t()

    def __deepcopy__(self, memo: dict[int, Any]) -> TwoHeads:
        with torch.random.fork_rng(devices=[]):
            twin = TwoHeads(self.split, self.first.dtype)
        twin.load_state_dict(self.state_dict())  # copies into the twin's views
        return twin


class TiedLanguageModel(nn.Module):
    """An embedding whose weight is also the output projection (one Parameter in two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(2000, 128)
        self.hidden = nn.Linear(128, 128)
        self.decoder = nn.Linear(128, 2000, bias=False)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(torch.tanh(self.hidden(self.embedding(tokens))))


def token_batch(generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 2000, (64,), generator=generator), torch.randint(0, 2000, (64,), generator=generator)


# ----- the two optimizers side by side ------------------------------------------------------
def ulps(ours: Tensor, theirs: Tensor) -> float:
    """The relative error (to the largest magnitude) in units of the dtype's eps."""
    return relative_error(ours, theirs) / torch.finfo(theirs.dtype).eps


class SideBySide:
    """A model (``build()`` from the seed) trained by FusedSGD, its deep copy by
    torch.optim.SGD(foreach=False), on the same batches.

    ``groups`` maps a model to its param groups (plain tensors); without it there is one group, of
    ``named_parameters()`` pairs when ``named``. ``batch`` draws ``(inputs, targets)``; with
    ``drawn_grads`` every gradient is drawn instead (the same values for both), in the
    parameter's memory format as autograd gives it.
    """

    def __init__(
        self,
        build: Callable[[], nn.Module],
        dtype: torch.dtype,
        *,
        batch: Callable[[torch.Generator, torch.dtype], tuple[Tensor, Tensor]] = mlp_batch,
        named: bool = False,
        groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
        drawn_grads: bool = False,
    ) -> None:
        self.seed = draw_seed()
        self.dtype = dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = build().to(dtype)
        self.twin = copy.deepcopy(self.model)
        if groups is not None:
            self.ours = FusedSGD(groups(self.model), **HP)
            self.theirs = torch.optim.SGD(groups(self.twin), foreach=False, **HP)
        else:
            self.ours = FusedSGD(list(self.model.named_parameters()) if named else self.model.parameters(), **HP)
            self.theirs = torch.optim.SGD(self.twin.parameters(), foreach=False, **HP)
        self.batch = batch
        self.drawn_grads = drawn_grads
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0

    def where(self, what: str) -> str:
        return f"seed {self.seed} ({self.dtype}), after {self.steps} steps: {what}"

    def pairs(self) -> Iterable[tuple[str, nn.Parameter, nn.Parameter]]:
        for (name, ours), theirs in zip(self.model.named_parameters(), self.twin.parameters(), strict=True):
            yield name, ours, theirs

    def backward(self) -> None:
        """Fresh gradients for both models, from a new batch (or drawn).

        fp32: each model's own ``loss.backward()`` (the two are bit for bit the same). fp16/bf16:
        torch's model's, copied to ours: a model's gradients depend on its parameters, so the two
        models' would differ by more than a rounding, and the parameters drift apart by tens of
        eps within steps (worst through small gradients, subnormal in fp16).
        """
        self.ours.zero_grad()
        self.theirs.zero_grad()
        if self.drawn_grads:
            for _, ours, theirs in self.pairs():
                grad = torch.empty_like(ours).copy_(torch.randn(ours.shape, generator=self.generator))
                ours.grad, theirs.grad = grad, grad.clone(memory_format=torch.preserve_format)
            return
        inputs, targets = self.batch(self.generator, self.dtype)
        for model in (self.model, self.twin) if self.dtype == torch.float32 else (self.twin,):
            F.cross_entropy(model(inputs).float(), targets).backward()
        if self.dtype != torch.float32:
            for _, ours, theirs in self.pairs():
                if theirs.grad is not None:
                    ours.grad = theirs.grad.clone(memory_format=torch.preserve_format)

    def step(self, *, new_grads: bool = True) -> None:
        if new_grads:
            self.backward()
        self.ours.step()
        self.theirs.step()
        self.steps += 1

    def train(self, steps: int) -> None:
        """``steps`` steps, comparing after each."""
        for _ in range(steps):
            self.step()
            self.check()

    def check(self, what: str = "", values_of_others: tuple[str, ...] = ()) -> None:
        """Every parameter and momentum buffer of ours is torch's (bit for bit in fp32), except the
        values of the parameters named in ``values_of_others``."""
        for name, ours, theirs in self.pairs():
            where = self.where(f"{what} {name}".strip())
            if name not in values_of_others:
                assert_close(ours, theirs, where, self.steps)
            mine, torchs = self.ours.state.get(ours, {}), self.theirs.state.get(theirs, {})
            buffer, reference = mine.get("momentum_buffer"), torchs.get("momentum_buffer")
            assert (buffer is None) == (reference is None), f"{where}: momentum buffer existence"
            if reference is not None:
                assert_close(buffer, reference, f"{where}: momentum buffer", self.steps)


def assert_close(ours: Tensor, theirs: Tensor, where: str, steps: int) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, where
    if ours.dtype == torch.float32:
        if not torch.equal(ours, theirs):
            diff = (ours.double() - theirs.double()).abs().max().item()
            raise AssertionError(f"{where}: not bit for bit torch's (max |diff| {diff:.3e})")
        return
    error = ulps(ours, theirs)
    assert error <= ULPS_PER_STEP * (steps + 2), f"{where}: {error:.2f} eps from torch's"


# ----- "nothing was modified" ---------------------------------------------------------------
@dataclass
class Saved:
    param: Tensor
    data_ptr: int
    values: Tensor
    shared: bool
    grad: Tensor | None
    grad_values: Tensor | None
    state: dict[str, Tensor]


def save(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[Saved]:
    saved = []
    for p in params:
        state = {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor)}
        grad = p.grad
        saved.append(
            Saved(
                p,
                p.data_ptr(),
                p.detach().clone(),
                p.is_shared(),
                grad,
                None if grad is None else grad.clone(),
                state,
            )
        )
    return saved


def assert_unchanged(optimizer: torch.optim.Optimizer, saved: list[Saved], where: str) -> None:
    for index, before in enumerate(saved):
        p = before.param
        here = f"{where}: parameter {index}"
        assert p.data_ptr() == before.data_ptr, f"{here} was moved"
        assert p.is_shared() == before.shared, f"{here}: is_shared() changed"
        assert torch.equal(p, before.values), f"{here}: values changed"
        assert p.grad is before.grad, f"{here}: .grad replaced"
        if before.grad is not None:
            assert torch.equal(p.grad, before.grad_values), f"{here}: gradient changed"
        state = {k: v for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor)}
        assert state.keys() == before.state.keys(), f"{here}: state keys {sorted(state)} != {sorted(before.state)}"
        for key, value in state.items():
            assert torch.equal(value, before.state[key]), f"{here}: state {key!r} changed"


def describe(named: bool, name: str, index: int) -> str:
    """How the error message names parameter ``index`` (``name`` in ``named_parameters()``)."""
    return (
        f"parameter '{name}' (param group 0, index {index}," if named else f"parameter (param group 0, index {index},"
    )


def refused_step(pair: SideBySide, saved: list[Saved], attempt: int, names: str, *phrases: str) -> str:
    """``pair.ours.step()`` raises ``InvalidParameterError`` (a ``ValueError``) whose message holds
    ``names`` (how it names the parameter) and every phrase, and leaves everything as ``saved``.
    Returns the message."""
    with pytest.raises(InvalidParameterError) as error:
        pair.ours.step()
    message = str(error.value)
    where = pair.where(f"attempt {attempt}: {message}")
    assert isinstance(error.value, ValueError), where
    assert names in message, where
    assert all(phrase in message for phrase in phrases), where
    assert_unchanged(pair.ours, saved, pair.where(f"attempt {attempt}: after the refused step"))
    return message


# ----- 1. shared memory (Hogwild, model.share_memory()) -------------------------------------
SHARE: dict[str, tuple[Callable[[nn.Module], object], int, str]] = {
    # how, and the parameter (index in parameters(), name) the error must name
    "model.share_memory()": (lambda model: model.share_memory(), 0, "0.weight"),
    "one parameter's share_memory_()": (lambda model: model[4].weight.share_memory_(), 4, "4.weight"),
}


@dtypes
@naming
@pytest.mark.parametrize("share", list(SHARE))
def test_shared_memory_before_the_first_step_is_refused_and_nothing_moves(
    share: str, named: bool, dtype: torch.dtype
) -> None:
    pair = SideBySide(mlp, dtype, named=named)
    make_shared, index, name = SHARE[share]
    make_shared(pair.model)
    pair.backward()
    saved = save(pair.ours, pair.model.parameters())
    for attempt in range(2):  # refused at every step, not once
        message = refused_step(pair, saved, attempt, describe(named, name, index), "shared memory", "torch.optim.SGD")
        where = pair.where(f"attempt {attempt}: {message}")
        if index:  # the first parameter is not shared, and not named
            assert describe(named, "0.weight", 0) not in message, where
        assert not pair.ours.state, where
    # Nothing was done: once the parameters have their own memory again, the same gradients
    # give torch's first step, momentum buffers included.
    for p in pair.model.parameters():
        if p.is_shared():
            p.data = p.data.clone()
    pair.step(new_grads=False)
    pair.check("after un-sharing")
    pair.train(2)


@dtypes
@naming
@pytest.mark.parametrize("share", list(SHARE))
def test_shared_memory_after_the_first_steps_is_refused_at_the_next_step(
    share: str, named: bool, dtype: torch.dtype
) -> None:
    pair = SideBySide(mlp, dtype, named=named)
    pair.train(2)
    SHARE[share][0](pair.model)  # torch's own call: it succeeds
    # The parameters are views of one flat buffer now: sharing any of them moves that buffer,
    # so every parameter is in shared memory, and the first one is named.
    assert all(p.is_shared() for p in pair.model.parameters()), pair.where("share_memory")
    pair.check("after share_memory()")  # moving to shared memory keeps the values
    pair.backward()
    saved = save(pair.ours, pair.model.parameters())
    for attempt in range(2):
        refused_step(pair, saved, attempt, describe(named, "0.weight", 0), "shared memory", "torch.optim.SGD")
        pair.check("after the refused step")  # still torch's values, before its third step


# ----- 2. aliased parameters ----------------------------------------------------------
@dtypes
@naming
def test_parameter_made_from_another_parameters_data_is_refused_naming_both(named: bool, dtype: torch.dtype) -> None:
    """``b = nn.Parameter(a.data)`` next to ``a``: torch would step that memory with both gradients."""
    seed = draw_seed()
    generator = torch.Generator().manual_seed(seed)
    model = mlp().to(dtype)
    alias = nn.Parameter(model[4].weight.data)
    params = [*model.named_parameters(), ("alias", alias)]
    optimizer = FusedSGD(params if named else [p for _, p in params], **HP)
    inputs, targets = mlp_batch(generator, dtype)
    F.cross_entropy(model(inputs).float(), targets).backward()
    alias.grad = torch.randn(alias.shape, generator=generator).to(dtype)
    saved = save(optimizer, [p for _, p in params])
    with pytest.raises(InvalidParameterError) as error:
        optimizer.step()
    message = str(error.value)
    where = f"seed {seed} ({dtype}): {message}"
    assert isinstance(error.value, ValueError), where
    assert describe(named, "4.weight", 4) in message, where
    assert describe(named, "alias", len(params) - 1) in message, where
    assert "share memory" in message, where
    assert_unchanged(optimizer, saved, where)
    assert not optimizer.state, where


OVERLAPS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "rows 0-599 and 400-1023": lambda base: (base[:600], base[400:]),
    "a tensor and its transpose": lambda base: (base, base.t()),
    "rows 100-299 and columns 200-399": lambda base: (base[100:300], base[:, 200:400]),
}


@dtypes
@naming
@pytest.mark.parametrize("overlap", list(OVERLAPS))
def test_overlapping_views_are_refused_naming_both(overlap: str, named: bool, dtype: torch.dtype) -> None:
    seed = draw_seed()
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(1024, 512, generator=generator).to(dtype)
    base_values = base.clone()
    first, second = (nn.Parameter(view) for view in OVERLAPS[overlap](base))
    other = nn.Parameter(torch.randn(300, generator=generator).to(dtype))
    params = [("other", other), ("first", first), ("second", second)]
    optimizer = FusedSGD(params if named else [p for _, p in params], **HP)
    for p in (other, first, second):
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)
    saved = save(optimizer, [other, first, second])
    with pytest.raises(InvalidParameterError) as error:
        optimizer.step()
    message = str(error.value)
    where = f"seed {seed} ({dtype}): {message}"
    assert isinstance(error.value, ValueError), where
    assert describe(named, "first", 1) in message and describe(named, "second", 2) in message, where
    assert describe(named, "other", 0) not in message, where
    assert_unchanged(optimizer, saved, where)
    assert torch.equal(base, base_values), where
    assert not optimizer.state, where


@dtypes
@naming
def test_p_data_set_to_another_parameters_data_mid_training_is_refused(named: bool, dtype: torch.dtype) -> None:
    """``model[6].weight.data = model[4].weight.data`` after two steps: the two parameters now overlap."""
    pair = SideBySide(mlp, dtype, named=named)
    pair.train(2)
    pair.model[6].weight.data = pair.model[4].weight.data
    pair.backward()
    saved = save(pair.ours, pair.model.parameters())
    with pytest.raises(InvalidParameterError) as error:
        pair.ours.step()
    message = str(error.value)
    where = pair.where(message)
    assert isinstance(error.value, ValueError), where
    assert describe(named, "4.weight", 4) in message and describe(named, "6.weight", 6) in message, where
    assert_unchanged(pair.ours, saved, where)
    pair.check("after the refused step", values_of_others=("6.weight",))  # torch's, after two steps


def rows(heads: Tensor) -> tuple[Tensor, Tensor]:
    return heads[:10], heads[10:]


def columns(heads: Tensor) -> tuple[Tensor, Tensor]:
    side_by_side = heads.reshape(10, 1024)  # the two heads' rows interleaved
    return side_by_side[:, :512], side_by_side[:, 512:]


def even_odd(heads: Tensor) -> tuple[Tensor, Tensor]:
    flat = heads.reshape(-1)
    return flat[0::2].view(10, 512), flat[1::2].view(10, 512)


def element_offsets(view: Tensor) -> set[int]:
    """The storage elements ``view`` covers."""
    index = torch.arange(view.untyped_storage().nbytes() // view.element_size())
    return set(index.as_strided(view.shape, view.stride(), view.storage_offset()).reshape(-1).tolist())


def check_disjoint_views(pair: SideBySide) -> None:
    for model in (pair.model, pair.twin):
        first, second = model.first, model.second
        assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr(), "one storage"
        assert not element_offsets(first) & element_offsets(second), "no element in common"


@dtypes
def test_disjoint_row_views_of_one_tensor_train_like_torch(dtype: torch.dtype) -> None:
    """``x[:10]`` and ``x[10:]`` are independent parameters to torch, and laid out as such."""
    pair = SideBySide(lambda: TwoHeads(rows, dtype), dtype)
    check_disjoint_views(pair)
    pair.train(6)


@dtypes
@pytest.mark.parametrize("split", [columns, even_odd], ids=["columns", "even_and_odd_elements"])
def test_interleaved_disjoint_views_of_one_tensor_train_like_torch(
    split: Callable[[Tensor], tuple[Tensor, Tensor]], dtype: torch.dtype
) -> None:
    # Drawn gradients: backward's matrix products round differently over interleaved and over
    # contiguous weights on some CPUs (ours move into the flat buffer, torch's stay views), which
    # is not the optimizer's doing.
    pair = SideBySide(lambda: TwoHeads(split, dtype), dtype, drawn_grads=True)
    check_disjoint_views(pair)
    pair.train(6)


@dtypes
def test_tied_weights_train_like_torch(dtype: torch.dtype) -> None:
    """What the aliasing error recommends: one Parameter in two modules (parameters() lists it once)."""
    pair = SideBySide(TiedLanguageModel, dtype, batch=token_batch)
    assert pair.model.decoder.weight is pair.model.embedding.weight
    pair.train(5)
    assert pair.model.decoder.weight is pair.model.embedding.weight


# ----- 2b. views into a storage something else holds (ZeRO's parameters_as_bucket_view) -------
def into_bucket(model: nn.Module) -> Tensor:
    """What ``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)`` does to a rank's parameters:
    one flat bucket, every parameter re-pointed to its slice, the bucket kept (ZeRO broadcasts it)."""
    params = list(model.parameters())
    bucket = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype)
    offset = 0
    for p in params:
        bucket[offset : offset + p.numel()].copy_(p.data.flatten())
        p.data = bucket[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return bucket


def refused_as_held_view(pair: SideBySide, named: bool) -> None:
    saved = save(pair.ours, pair.model.parameters())
    for attempt in range(2):
        refused_step(
            pair,
            saved,
            attempt,
            describe(named, "0.weight", 0),
            "parameters_as_bucket_view=False",
            "shares its storage",
        )


@dtypes
@naming
def test_views_into_a_held_bucket_are_refused_and_nothing_moves(named: bool, dtype: torch.dtype) -> None:
    """Moving them into a flat buffer would leave the bucket (what ZeRO broadcasts) with stale values."""
    pair = SideBySide(mlp, dtype, named=named)
    bucket, twin_bucket = into_bucket(pair.model), into_bucket(pair.twin)
    pair.backward()
    before = bucket.clone()
    refused_as_held_view(pair, named)
    assert torch.equal(bucket, before), pair.where("the bucket changed")
    del bucket  # nothing holds the bucket but the parameters: the same gradients give torch's first step
    pair.step(new_grads=False)
    pair.check("after the bucket was dropped")
    pair.train(2)
    assert twin_bucket.data_ptr() == pair.twin[0].weight.data_ptr(), "torch steps the bucket in place"


@naming
def test_views_into_a_held_bucket_after_the_first_steps_are_refused_at_the_next_step(named: bool) -> None:
    pair = SideBySide(mlp, torch.float32, named=named)
    pair.train(2)
    bucket = into_bucket(pair.model)
    into_bucket(pair.twin)
    pair.backward()
    refused_as_held_view(pair, named)
    assert bucket.numel() == sum(p.numel() for p in pair.model.parameters())


@dtypes
def test_a_flat_view_kept_over_a_parameter_is_refused(dtype: torch.dtype) -> None:
    """ZeRO's bucket of one parameter is a flat view over its whole storage: it sees torch's in-place
    updates, it would not see ours."""
    pair = SideBySide(mlp, dtype, named=True)
    alias = pair.model[0].weight.detach().view(-1)
    pair.backward()
    refused_as_held_view(pair, named=True)
    del alias
    pair.step(new_grads=False)
    pair.check("after the alias was dropped")


def test_a_same_shape_alias_kept_is_not_refused_and_keeps_the_old_values() -> None:
    """``p.data = w`` (or ``nn.Parameter(w)``) with ``w`` kept is how weights are set: it trains like
    torch; ``w`` keeps the values it had at the first step (docs/migration.md)."""
    pair = SideBySide(mlp, torch.float32)
    kept = pair.model[0].weight.detach()
    first_values = kept.clone()
    pair.train(2)
    assert torch.equal(kept, first_values)
    assert not torch.equal(pair.model[0].weight, first_values)


def test_a_graph_kept_with_retain_graph_at_the_first_step_is_not_a_holder() -> None:
    """Autograd's saved views of the weights (``weight.t()``) hold their storage too, without a Python
    object: a first step taken while such a graph is kept trains like torch."""
    pair = SideBySide(mlp, torch.float32)
    inputs, targets = mlp_batch(pair.generator, torch.float32)
    losses = [F.cross_entropy(model(inputs), targets) for model in (pair.model, pair.twin)]
    for loss in losses:
        loss.backward(retain_graph=True)
    pair.step(new_grads=False)
    pair.check("first step with the graph kept")
    del losses
    pair.train(2)


# ----- 3. .data swapped between parameters, or replaced --------------------------------------
def two_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Layer 6 in a group of its own, with other hyperparameters."""
    late = list(model[6].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in late)]
    return [{"params": rest}, {"params": late, "lr": 0.02, "momentum": 0.5, "dampening": 0.2, "weight_decay": 0}]


def swap(first: nn.Linear, second: nn.Linear) -> None:
    first.weight.data, second.weight.data = second.weight.data, first.weight.data
    first.bias.data, second.bias.data = second.bias.data, first.bias.data


def replace(model: nn.Module, seed: int) -> None:
    values = torch.Generator().manual_seed(seed)
    for layer in (2, 6):
        for p in model[layer].parameters():
            p.data = (torch.randn(p.shape, generator=values) / 512**0.5).to(p.dtype)


CHANGES: dict[str, Callable[[nn.Module, int], None]] = {
    "swap within a group": lambda model, seed: swap(model[2], model[4]),
    "swap across groups": lambda model, seed: swap(model[2], model[6]),
    "fresh tensors": replace,
}


@dtypes
@pytest.mark.parametrize("change", list(CHANGES))
def test_data_swapped_or_replaced_mid_training_matches_torch_step_for_step(change: str, dtype: torch.dtype) -> None:
    """torch: each parameter keeps its momentum buffer and param group, and steps its new data."""
    pair = SideBySide(mlp, dtype, groups=two_groups)
    pair.train(3)
    for round_ in range(2):  # a second swap puts the values back in their first parameters
        for model in (pair.model, pair.twin):
            CHANGES[change](model, pair.seed + round_)
        pair.check(f"{change} ({round_})")
        pair.train(3)
        flat = pair.ours.get_combined_params()[0].untyped_storage().data_ptr()
        for name, p in pair.model.named_parameters():  # re-adopted: back in the flat buffer
            assert p.untyped_storage().data_ptr() == flat, pair.where(f"{name} is not in the flat buffer")


# ----- 6. channels_last --------------------------------------------------------------------
def channels_last_convnet() -> nn.Module:
    return convnet().to(memory_format=torch.channels_last)  # type: ignore[call-overload]


@dtypes
def test_channels_last_parameters_keep_their_strides_and_train_like_torch(dtype: torch.dtype) -> None:
    # fp16/bf16: gradients drawn, channels_last as autograd gives them for these weights. (fp16
    # convolution backward takes about 0.5 s a step on the CPU, and through BatchNorm a rounding
    # difference between the two models grows to several eps of the parameters within steps.)
    pair = SideBySide(channels_last_convnet, dtype, batch=image_batch, drawn_grads=dtype != torch.float32)
    convs = {name: p for name, p in pair.model.named_parameters() if p.dim() == 4}
    assert len(convs) == 3 and not any(p.is_contiguous() for p in convs.values())
    strides = {name: p.stride() for name, p in convs.items()}
    for _ in range(5):
        pair.train(1)
        flat = pair.ours.get_combined_params()[0].untyped_storage().data_ptr()
        for name, p in pair.model.named_parameters():
            assert p.untyped_storage().data_ptr() == flat, pair.where(f"{name} is not in the flat buffer")
            if name in convs:
                assert p is convs[name], pair.where(name)
                assert p.is_contiguous(memory_format=torch.channels_last), pair.where(f"{name} not channels_last")
                assert p.stride() == strides[name], pair.where(f"{name} strides {p.stride()} != {strides[name]}")


# ----- 7. untyped_storage().resize_(0): FSDP / offloading free and refill ---------------------
RESIZED: dict[str, Callable[[SideBySide], Tensor]] = {
    "first parameter": lambda pair: pair.model[0].weight,
    "middle parameter": lambda pair: pair.model[4].bias,
    "momentum buffer": lambda pair: pair.ours.state[pair.model[6].weight]["momentum_buffer"],
}


@dtypes
@pytest.mark.parametrize("target", list(RESIZED))
def test_resizing_storage_to_zero_is_refused_by_torch_and_training_continues(target: str, dtype: torch.dtype) -> None:
    pair = SideBySide(mlp, dtype)
    pair.train(2)
    tensor = RESIZED[target](pair)
    nbytes = tensor.untyped_storage().nbytes()
    saved = save(pair.ours, pair.model.parameters())
    with pytest.raises(RuntimeError, match=re.escape(NOT_RESIZABLE)):
        tensor.untyped_storage().resize_(0)
    assert tensor.untyped_storage().nbytes() == nbytes, pair.where("resized")
    assert_unchanged(pair.ours, saved, pair.where(f"after resize_(0) of the {target}"))
    pair.check(f"after resize_(0) of the {target}")
    pair.train(3)  # torch's side takes the same steps, without the resize attempt
