"""The torch_npu stand-in against torch_npu's documented behaviour, on CPU tensors."""

from __future__ import annotations

import gc
import sys
import types

import pytest
import torch
from torch import nn

from fused_testing.npu_standin import (
    dangling,
    fresh_npu_import,
    installed_standin,
    make_module,
    storage_size_of,
    torch_npu_blocked,
)

ND, NCHW, NC1HWC0, FRACTAL_Z, FRACTAL_NZ = 2, 0, 3, 4, 29


@pytest.fixture
def torch_npu():
    with installed_standin() as module:
        yield module


def use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


# ----- storage sizes and format casts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fmt", "size"),
    [
        ((2, 3), ND, 6),
        ((8, 3, 3, 3), NCHW, 216),
        ((8, 3, 3, 3), NC1HWC0, 8 * 1 * 3 * 3 * 16),  # C: 3 -> 16
        ((2, 33, 4, 5), NC1HWC0, 2 * 3 * 4 * 5 * 16),  # C: 33 -> 48
        ((8,), NC1HWC0, 16),  # a 1-D tensor is read as C
        ((4, 3, 3, 3), FRACTAL_Z, 1 * 3 * 3 * 1 * 16 * 16),  # C and N padded to 16
        ((20, 17), FRACTAL_NZ, 2 * 2 * 16 * 16),  # both last dims padded to 16
        ((3, 20, 17), FRACTAL_NZ, 3 * 2 * 2 * 16 * 16),
        ((5,), FRACTAL_NZ, 16 * 16),
        ((32, 16), FRACTAL_NZ, 512),  # already blocked: no padding
    ],
)
def test_storage_sizes_follow_torch_npu(shape, fmt, size) -> None:
    assert storage_size_of(shape, fmt) == size


def test_unknown_format_or_shape_is_an_error(torch_npu) -> None:
    with pytest.raises(RuntimeError, match="unknown format"):
        torch_npu.npu_format_cast(torch.zeros(2, 3), 30)
    with pytest.raises(RuntimeError, match="NCHW"):
        torch_npu.npu_format_cast(torch.zeros(2, 3, 4, 5, 6), NC1HWC0)


def test_cast_to_a_padded_format_keeps_values_and_pads_the_storage(torch_npu) -> None:
    weight = torch.randn(8, 3, 3, 3)
    assert torch_npu.get_npu_format(weight) == ND
    cast = torch_npu.npu_format_cast(weight, NC1HWC0)
    assert cast is not weight and torch_npu.get_npu_format(weight) == ND
    assert torch_npu.get_npu_format(cast) == NC1HWC0
    assert torch_npu.get_storage_size(cast) == 1152 and cast.numel() == 216
    assert torch.equal(cast, weight) and cast.stride() == weight.stride()
    storage = torch.empty(0).set_(cast.untyped_storage())
    assert torch.equal(storage[:216], weight.flatten()), "logical order in the first numel elements"
    assert not storage[216:].any(), "padding is zero"
    back = torch_npu.npu_format_cast(cast, ND)
    assert torch_npu.get_npu_format(back) == ND and torch_npu.get_storage_size(back) == 216
    assert torch.equal(back, weight)


def test_cast_keeps_dense_strides_and_is_not_recorded_by_autograd(torch_npu) -> None:
    weight = nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    cast = torch_npu.npu_format_cast(weight, FRACTAL_Z)
    assert cast.stride() == weight.stride() and torch.equal(cast, weight)
    assert not cast.requires_grad and cast.grad_fn is None


def test_cast_to_the_same_format_returns_the_tensor_and_base_casts_relabel_in_place(torch_npu) -> None:
    t = torch.randn(2, 3)
    view = t.detach()
    assert torch_npu.npu_format_cast(t, ND) is t
    assert torch_npu.npu_format_cast(t, NCHW) is t
    assert torch_npu.get_npu_format(t) == NCHW and torch_npu.get_npu_format(view) == NCHW
    assert torch_npu.get_storage_size(t) == 6


def test_only_float_types_can_take_a_private_format(torch_npu) -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch_npu.get_npu_format(torch_npu.npu_format_cast(torch.ones(2, 16, dtype=dtype), FRACTAL_NZ)) == 29
    with pytest.raises(RuntimeError, match="can not cast format"):
        torch_npu.npu_format_cast(torch.ones(2, 16, dtype=torch.int32), FRACTAL_NZ)


def test_the_format_belongs_to_the_storage(torch_npu) -> None:
    """As in torch_npu, where it lives in the storage descriptor: ``p.data``, ``detach()`` and views
    share it, and ``set_`` onto another storage takes that storage's."""
    p = nn.Parameter(torch.randn(4, 3, 2, 2))
    p.data = torch_npu.npu_format_cast(p.data, NC1HWC0)
    assert torch_npu.get_npu_format(p) == NC1HWC0
    for alias in (p.data, p.detach(), p.detach().view(-1)[:5]):
        assert torch_npu.get_npu_format(alias) == NC1HWC0
    flat = torch.zeros(100)
    with torch.no_grad():
        p.set_(flat.untyped_storage(), 10, (4, 3, 2, 2), (12, 4, 2, 1))
    assert torch_npu.get_npu_format(p) == ND
    assert torch_npu.get_storage_size(p) == 100, "a tensor set_ onto a flat buffer reports the whole buffer"


# ----- npu_change_data_ptr -----------------------------------------------------------------------


def test_change_data_ptr_repoints_without_sharing_the_storage(torch_npu) -> None:
    flat = torch.zeros(3000)
    count = use_count(flat)
    p = nn.Parameter(torch_npu.npu_format_cast(torch.randn(8, 3, 3, 3), NC1HWC0))
    values = p.detach().clone()
    shape, stride = p.shape, p.stride()
    assert torch_npu.npu_change_data_ptr(p, flat, 128) == 0
    assert p.data_ptr() == flat.data_ptr() + 128 * 4
    assert (p.shape, p.stride(), torch_npu.get_npu_format(p), torch_npu.get_storage_size(p)) == (
        shape,
        stride,
        NC1HWC0,
        1152,
    )
    assert p.untyped_storage()._cdata != flat.untyped_storage()._cdata
    assert use_count(flat) == count, "the binding is invisible to the source's use count"
    with torch.no_grad():
        p.copy_(values)
    assert torch.equal(flat[128 : 128 + 216].view(8, 3, 3, 3), values)
    flat.mul_(2)
    assert torch.equal(p, 2 * values), "writes to the source show through the re-pointed tensor"


def test_change_data_ptr_offset_counts_from_the_source_storage_start(torch_npu) -> None:
    base = torch.zeros(600)
    src = base[100:]  # a view: the index is still counted from the storage's first element
    dst = torch.zeros(50)
    torch_npu.npu_change_data_ptr(dst, src, 20)
    assert dst.data_ptr() == base.data_ptr() + 20 * 4


def test_change_data_ptr_checks_like_torch_npu(torch_npu) -> None:
    flat = torch.zeros(100)
    with pytest.raises(RuntimeError, match="greater than zero"):
        torch_npu.npu_change_data_ptr(torch.zeros(4), flat, -1)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch_npu.npu_change_data_ptr(torch.zeros(4, dtype=torch.float16), flat, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch_npu.npu_change_data_ptr(torch.zeros(4, dtype=torch.float64), flat.double(), 0)
    with pytest.raises(RuntimeError, match="overflow"):
        torch_npu.npu_change_data_ptr(torch.zeros(10), flat, 91)
    torch_npu.npu_change_data_ptr(torch.zeros(10), flat, 90)  # the last fitting offset


def test_dangling_tells_when_the_hardware_would_have_freed_the_memory(torch_npu) -> None:
    flat = torch.arange(64.0)
    p = torch.zeros(8)
    torch_npu.npu_change_data_ptr(p, flat, 8)
    assert not dangling(p) and not dangling(flat)
    del flat
    gc.collect()
    assert dangling(p)
    assert torch.equal(p, torch.arange(8.0, 16.0)), "the stand-in keeps the memory readable"


# ----- the npu namespace: GradScaler, autocast ------------------------------------------------------


def _scaled_run(scaler: torch.amp.GradScaler) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scales = []
    for step in range(6):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).square().sum()).backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, model.weight.detach()


def test_grad_scaler_behaves_like_torchs_on_the_cpu(torch_npu) -> None:
    from torch_npu.npu.amp import GradScaler

    assert GradScaler is torch_npu.npu.amp.GradScaler
    ours = GradScaler(init_scale=2.0**10, growth_interval=2)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    (our_scales, our_weight), (their_scales, their_weight) = _scaled_run(ours), _scaled_run(theirs)
    assert our_scales == their_scales and our_scales[2] == our_scales[1] / 2  # the inf step backed off
    assert torch.equal(our_weight, their_weight)
    assert GradScaler().get_scale() == 2.0**16
    with pytest.raises(NotImplementedError, match="dynamic=False"):
        GradScaler(dynamic=False)


def test_autocast_is_cpu_autocast_in_float16_by_default(torch_npu) -> None:
    from torch_npu.npu.amp import autocast

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast():
        assert (a @ b).dtype == torch.float16
    with autocast(dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(enabled=False):
        assert (a @ b).dtype == torch.float32


def test_the_stand_in_leaves_torch_alone() -> None:
    had = hasattr(torch, "npu"), hasattr(torch.Tensor, "npu")
    module = make_module()
    assert module.npu.is_available() is False and module.npu.device_count() == 0
    assert (hasattr(torch, "npu"), hasattr(torch.Tensor, "npu")) == had


# ----- installing and blocking ----------------------------------------------------------------------


def test_installed_standin_is_what_import_gives_and_is_removed_after() -> None:
    before = sys.modules.get("torch_npu", "absent")
    with installed_standin() as module:
        import torch_npu
        from torch_npu.npu.amp import GradScaler, autocast  # torch_npu's own example imports these

        assert torch_npu is module and GradScaler is module.npu.amp.GradScaler and autocast is module.npu.amp.autocast
    assert sys.modules.get("torch_npu", "absent") == before


def test_blocked_torch_npu_cannot_be_imported(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    earlier = sys.modules["torch_npu"]
    with torch_npu_blocked():
        with pytest.raises(ImportError):
            import torch_npu  # noqa: F401
    assert sys.modules["torch_npu"] is earlier, "restored"


def test_fused_cores_cached_npu_backend_is_forgotten_inside_and_restored_after(monkeypatch) -> None:
    """Without importing fused_core (this package does not depend on it): a stand-in for its
    ``backends`` package, with the lazily imported npu backend cached."""
    backends = types.ModuleType("fused_core.backends")
    cached_module, cached_backend = types.ModuleType("fused_core.backends.npu"), object()
    backends._loaded = {"cpu": "cpu backend", "npu": cached_backend}  # type: ignore[attr-defined]
    backends.npu = cached_module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fused_core.backends", backends)
    monkeypatch.setitem(sys.modules, "fused_core.backends.npu", cached_module)
    with installed_standin():
        assert "fused_core.backends.npu" not in sys.modules
        assert backends._loaded == {"cpu": "cpu backend"} and not hasattr(backends, "npu")
        # what importing the backend inside the block would leave behind
        backends._loaded["npu"] = "bound to the stand-in"
        sys.modules["fused_core.backends.npu"] = backends.npu = types.ModuleType("fused_core.backends.npu")
    assert sys.modules["fused_core.backends.npu"] is cached_module and backends.npu is cached_module
    assert backends._loaded == {"cpu": "cpu backend", "npu": cached_backend}


def test_nothing_cached_before_means_nothing_cached_after() -> None:
    names = ("torch_npu", "torch_npu.npu", "torch_npu.npu.amp", "fused_core.backends.npu")
    before = {name: sys.modules.get(name) for name in names}
    with fresh_npu_import({"torch_npu": make_module()}):
        pass
    assert {name: sys.modules.get(name) for name in names} == before
