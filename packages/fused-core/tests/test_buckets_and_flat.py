"""Dtype buckets and flat buffers: parameters move into one flat buffer per (device, dtype)
yet keep their identity, shape, strides, requires_grad and values; each param group is one
contiguous range of its bucket; gradients are views into the flat gradient buffer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_core.buckets import is_dense
from fused_core.layout import Layout
from fused_testing import relative_error


def _odd_layouts(generator: torch.Generator) -> dict[str, nn.Parameter]:
    """Parameters with every layout the flat buffers must preserve, in three dtypes."""
    conv = nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
    base = nn.Parameter(torch.randn(50, 70, generator=generator))
    frozen = nn.Parameter(torch.randn(40, 25, generator=generator), requires_grad=False)
    wide = torch.randn(64, 96, generator=generator)
    params = {
        "linear": nn.Parameter(torch.randn(300, 40, generator=generator)),
        "conv_channels_last": conv.weight,
        "transposed": nn.Parameter(base.data.t()),
        "half": nn.Parameter(torch.randn(1000, generator=generator).half()),
        "bfloat": nn.Parameter(torch.randn(30, 20, generator=generator).bfloat16().t()),
        "half_channels_last": nn.Parameter(
            torch.randn(8, 6, 5, 5, generator=generator).half().to(memory_format=torch.channels_last)
        ),
        "frozen": frozen,
        "scalar": nn.Parameter(torch.randn((), generator=generator)),
        "empty": nn.Parameter(torch.randn(0, 7, generator=generator)),
        "sliced": nn.Parameter(wide[:, 10:60]),  # not dense: documented to become contiguous
    }
    assert params["conv_channels_last"].is_contiguous(memory_format=torch.channels_last)
    assert not params["conv_channels_last"].is_contiguous()
    assert params["transposed"].stride() == (1, 70)
    return params


def _grads(params: dict[str, nn.Parameter], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh gradients, laid out like their (dense) parameter as autograd does.

    Small random integers: with beta = 0.5 every momentum of a few steps is then exact in
    fp16/bf16/fp32, so sign(m) is exactly the float64 reference's and the parameters differ
    from it only by their own rounding (one half-ulp per step)."""
    grads = {}
    for name, p in params.items():
        if p.requires_grad:
            grad = torch.randint(-8, 9, p.shape, generator=generator).to(p.dtype)
            grads[name] = grad.as_strided(p.shape, p.stride()) if is_dense(p) else grad
    return grads


def _bucket_of(optimizer, param):
    for bucket in optimizer._layout.buckets:
        for slot in bucket.plan.slots:
            if slot.param is param:
                return bucket, slot
    raise AssertionError("parameter is in no bucket")


def test_first_step_keeps_identity_shape_strides_and_values(signum, generator) -> None:
    params = _odd_layouts(generator)
    before = {
        name: (id(p), p.shape, p.stride(), p.requires_grad, p.dtype, p.detach().clone(), p.untyped_storage().data_ptr())
        for name, p in params.items()
    }
    grads = _grads(params, generator)
    for name, grad in grads.items():
        params[name].grad = grad.clone()
    optimizer = signum.Signum(list(params.values()), lr=0.0)  # lr = 0: values must come back bit for bit
    optimizer.step()

    for name, p in params.items():
        ident, shape, stride, requires_grad, dtype, values, storage = before[name]
        assert id(p) == ident and p.shape == shape and p.dtype == dtype, name
        assert p.requires_grad == requires_grad, name
        if name == "sliced":
            assert p.is_contiguous(), "a non-dense parameter is laid out contiguously"
        else:
            assert p.stride() == stride, name
        assert torch.equal(p, values), name
        bucket, slot = _bucket_of(optimizer, p)
        # It really moved: it now lives in its bucket's flat buffer, at its slot.
        assert p.untyped_storage().data_ptr() == bucket.params.untyped_storage().data_ptr(), name
        assert p.untyped_storage().data_ptr() != storage or p.numel() == 0, name
        assert p.storage_offset() == bucket.params.storage_offset() + slot.offset, name
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
            assert p.grad.stride() == p.stride(), name
        else:
            assert p.grad is None and p not in optimizer.state
    # lr = 0 still ran the update: the momentum is (1 - beta) g.
    for name, grad in grads.items():
        momentum = optimizer.state[params[name]]["momentum"]
        expected = grad.double() * (1 - 0.9)
        assert relative_error(momentum, expected) <= torch.finfo(grad.dtype).eps, name


def test_odd_layouts_train_like_the_reference(signum, generator) -> None:
    """Channels_last, transposed, 0-dim, empty, sliced, frozen and fp16/bf16 parameters, several steps:
    each parameter against the per-tensor reference in float64, fed the same gradients."""
    params = _odd_layouts(generator)
    twins = {name: nn.Parameter(p.detach().double(), requires_grad=p.requires_grad) for name, p in params.items()}
    optimizer = signum.Signum(list(params.values()), lr=0.01, beta=0.5)
    reference = signum.Reference(list(twins.values()), lr=0.01, beta=0.5)
    for step in range(4):
        for name, grad in _grads(params, generator).items():
            params[name].grad = grad
            twins[name].grad = grad.double()
        optimizer.step()
        reference.step()
        for name, p in params.items():
            # one rounding to the parameter's dtype per step (see _grads)
            tolerance = (step + 1) * torch.finfo(p.dtype).eps
            assert relative_error(p, twins[name]) <= tolerance, f"{name} at step {step}"
            assert (p in optimizer.state) == (twins[name] in reference.state), f"state of {name}"
            if p in optimizer.state:
                momentum, expected = optimizer.state[p]["momentum"], reference.state[twins[name]]["momentum"]
                assert momentum.shape == p.shape and relative_error(momentum, expected) <= torch.finfo(p.dtype).eps
    assert torch.equal(params["frozen"], twins["frozen"].to(torch.float32))
    assert params["scalar"].shape == () and params["empty"].shape == (0, 7)


def _count_cold_paths(monkeypatch) -> tuple[list[int], list[int]]:
    reconciles: list[int] = []
    layouts: list[int] = []
    original_reconcile, original_init = Layout.reconcile, Layout.__init__
    monkeypatch.setattr(
        Layout, "reconcile", lambda self, state: reconciles.append(1) or original_reconcile(self, state)
    )
    monkeypatch.setattr(Layout, "__init__", lambda self, *a, **k: layouts.append(1) or original_init(self, *a, **k))
    return reconciles, layouts


@pytest.mark.parametrize("set_to_none", [True, False], ids=["fresh-gradients", "gradients-in-place"])
def test_steady_state_takes_the_hot_path(signum, generator, monkeypatch, set_to_none: bool) -> None:
    """Once laid out, steps re-adopt nothing, whether autograd hands over fresh gradient tensors
    (torch's default zero_grad) or accumulates into the existing ones (set_to_none=False), even
    with 0-dim and empty parameters; and every gradient the user set stays ``p.grad``."""
    params = _odd_layouts(generator)
    optimizer = signum.Signum(list(params.values()), lr=0.01)
    for name, grad in _grads(params, generator).items():
        params[name].grad = grad
    for _ in range(3):  # the first steps lay out and initialise state
        optimizer.step()
    reconciles, layouts = _count_cold_paths(monkeypatch)
    for _ in range(4):
        optimizer.zero_grad(set_to_none=set_to_none)
        for name, grad in _grads(params, generator).items():
            if set_to_none:
                assert params[name].grad is None
                params[name].grad = grad  # what backward does after zero_grad()
            else:
                params[name].grad.add_(grad)  # what backward does to an existing gradient
        given = {name: p.grad for name, p in params.items()}
        optimizer.step()
        assert all(params[name].grad is grad for name, grad in given.items())
    assert reconciles == [] and layouts == []
    # the probe is live: re-pointing one parameter is noticed
    params["linear"].data = params["linear"].detach().clone()
    optimizer.step()
    assert reconciles or layouts


def test_one_bucket_per_dtype_and_each_group_contiguous(signum, generator) -> None:
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    shapes = [(257,), (31, 17), (4, 3, 3, 3), (1000,), (12, 40)]
    groups = []
    for group_index in range(3):
        params = [
            nn.Parameter(torch.randn(shape, generator=generator).to(dtypes[(i + group_index) % 3]))
            for i, shape in enumerate(shapes * 2)
        ]
        groups.append({"params": params, "lr": 0.01 * (group_index + 1)})
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    optimizer = signum.Signum(groups, lr=0.5)
    optimizer.step()
    layout = optimizer._layout

    assert sorted(str(bucket.plan.dtype) for bucket in layout.buckets) == sorted(str(d) for d in dtypes)
    seen = set()
    for bucket in layout.buckets:
        itemsize = bucket.params.element_size()
        slots = bucket.plan.slots
        for slot in slots:
            p = slot.param
            assert p.dtype == bucket.plan.dtype and p.numel() == slot.numel
            assert p is groups[slot.group]["params"][slot.index]
            assert p.data_ptr() == bucket.params.data_ptr() + slot.offset * itemsize
            seen.add(id(p))
        # slots in (group, index) order, disjoint, inside the buffer
        assert [(s.group, s.index) for s in slots] == sorted((s.group, s.index) for s in slots)
        assert all(a.end <= b.offset for a, b in zip(slots, slots[1:]))
        assert slots[-1].end <= bucket.params.numel()
        # one launch range per group present in the bucket, covering exactly that group's range
        ranges = [span for span in layout.ranges if span.bucket is bucket]
        assert [span.group for span in ranges] == sorted({slot.group for slot in slots})
        for span in ranges:
            members = [slot for slot in slots if slot.group == span.group]
            assert slots[span.first : span.last] == members
            start, end = members[0].offset, members[-1].end
            assert span.params.data_ptr() == bucket.params.data_ptr() + start * itemsize
            assert span.params.numel() == end - start
            assert span.params.dtype == bucket.plan.dtype and span.params.is_contiguous()
        # writing the flat buffer writes the parameters: they are views of it
        marks = torch.arange(bucket.params.numel(), dtype=torch.float64) / 4096
        bucket.params.copy_(marks)
        for slot in slots:
            expected = marks.to(bucket.plan.dtype).as_strided(slot.param.shape, slot.param.stride(), slot.offset)
            assert torch.equal(slot.param, expected)
    assert seen == {id(p) for group in groups for p in group["params"]}


def test_grads_are_views_into_the_flat_grad_buffer(signum, generator) -> None:
    params = _odd_layouts(generator)
    twins = {name: nn.Parameter(p.detach().double(), requires_grad=p.requires_grad) for name, p in params.items()}
    optimizer = signum.Signum(list(params.values()), lr=0.01, beta=0.5)
    reference = signum.Reference(list(twins.values()), lr=0.01, beta=0.5)
    for name, grad in _grads(params, generator).items():
        params[name].grad = grad
        twins[name].grad = grad.double()
    optimizer.step()
    reference.step()
    optimizer.get_combined_grads()  # binds every gradient to the flat gradient buffer
    grads_before = {name: p.grad for name, p in params.items()}

    # Write new gradients through the flat buffers only...
    for bucket in optimizer._layout.buckets:
        fresh = torch.randn(bucket.grads.numel(), generator=generator).to(bucket.grads.dtype)
        bucket.grads.copy_(fresh)
        for slot in bucket.plan.slots:
            p = slot.param
            if p.grad is None:
                continue
            assert torch.equal(p.grad, fresh.as_strided(p.shape, p.stride(), slot.offset)), slot.describe()
    # ...and through p.grad: both are the same memory.
    linear = params["linear"]
    linear.grad.mul_(-1)
    bucket, slot = _bucket_of(optimizer, linear)
    assert torch.equal(bucket.grads[slot.offset : slot.end].view(linear.shape), linear.grad)

    for name, p in params.items():
        assert p.grad is grads_before[name], "the same gradient tensors, re-filled in place"
        if p.grad is not None:
            twins[name].grad = p.grad.double()
    optimizer.step()
    reference.step()
    for name, p in params.items():
        assert relative_error(p, twins[name]) <= 2 * torch.finfo(p.dtype).eps, name


def _covers_consecutive_storage(tensor: torch.Tensor) -> bool:
    """Independent definition of density: the storage elements the tensor addresses are
    ``numel`` distinct consecutive ones."""
    if tensor.numel() == 0:
        return True
    size = tensor.untyped_storage().nbytes() // tensor.element_size()
    addressed = torch.arange(size).as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
    addressed = addressed.flatten().sort().values
    return torch.equal(addressed, torch.arange(addressed[0].item(), addressed[0].item() + tensor.numel()))


def _layout_cases() -> dict[str, tuple[torch.Tensor, bool]]:
    x = torch.randn(6, 8, 10)
    image = torch.randn(4, 3, 5, 7)
    return {
        "contiguous": (x, True),
        "channels_last": (image.to(memory_format=torch.channels_last), True),
        "channels_last_3d": (torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d), True),
        "transposed": (x[0].t(), True),
        "permuted": (x.permute(2, 0, 1), True),
        "row_slice": (x[1:4], True),
        "column_slice": (x[:, :, 2:7], False),
        "strided_slice": (x[::2], False),
        "transposed_slice": (x[0].t()[1:], False),
        "expanded": (torch.randn(6, 1).expand(6, 9), False),
        "broadcast_scalar": (torch.tensor(1.0).expand(3, 4), False),
        "diagonal": (x[0].diagonal(), False),
        "overlapping": (torch.randn(20).as_strided((3, 3), (1, 1)), False),
        "unsqueezed": (x.unsqueeze(1), True),
        "size_one_odd_stride": (torch.randn(12).as_strided((3, 1, 4), (4, 99, 1)), True),
        "zero_dim": (torch.tensor(3.0), True),
        "empty": (torch.empty(0, 3), True),
        "single_element_slice": (x[2:3, 4:5, 6:7], True),
    }


@pytest.mark.parametrize("case", list(_layout_cases()))
def test_is_dense_on_named_layouts(case: str) -> None:
    tensor, dense = _layout_cases()[case]
    assert _covers_consecutive_storage(tensor) == dense  # the case is what its name says
    assert is_dense(tensor) == dense


def test_is_dense_on_random_views() -> None:
    generator = torch.Generator().manual_seed(7)
    checked = {True: 0, False: 0}
    for _ in range(300):
        ndim = int(torch.randint(1, 5, (1,), generator=generator))
        shape = [int(s) for s in torch.randint(1, 6, (ndim,), generator=generator)]
        view = torch.empty(shape).permute(*torch.randperm(ndim, generator=generator).tolist())
        for dim in range(ndim):
            if view.shape[dim] > 1 and torch.rand(1, generator=generator) < 0.3:
                start = int(torch.randint(0, view.shape[dim] - 1, (1,), generator=generator))
                step = int(torch.randint(1, 3, (1,), generator=generator))
                view = view.narrow(dim, start, view.shape[dim] - start)[
                    (slice(None),) * dim + (slice(None, None, step),)
                ]
        expected = _covers_consecutive_storage(view)
        assert is_dense(view) == expected, (tuple(view.shape), view.stride())
        checked[expected] += 1
    assert min(checked.values()) > 30, checked  # both answers were exercised
