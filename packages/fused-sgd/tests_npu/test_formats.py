"""NPU-private formats: parameters cast with torch_npu.npu_format_cast keep their format and their
values in the flat buffer, their slots are sized by torch_npu.get_storage_size, ND gradients are
cast to the parameter's format, and the updates match torch.optim.SGD on identically cast tensors."""

from __future__ import annotations

import pytest
import torch
from npu_suite import (
    FIXED_RTOL,
    FRACTAL_NZ,
    FRACTAL_Z,
    NC1HWC0,
    ND,
    cast_like_torch_npu,
    copies,
    make_params,
    max_error,
    run_fixed,
    torch_sgd,
    train_pair,
)

from fused_sgd import FusedSGD, NpuFusedSGD

HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
# conv weights (FRACTAL_Z, NC1HWC0), a linear weight (FRACTAL_NZ), and ND tensors between them
FORMATTED = [((16, 3, 3, 3), FRACTAL_Z), ((10,), ND), ((8, 5, 3, 3), NC1HWC0), ((20, 33), FRACTAL_NZ), ((7,), ND)]


def _formatted_params(device: torch.device, torch_npu, dtype: torch.dtype = torch.float32) -> list:
    params = make_params(device, dtype, shapes=[shape for shape, _ in FORMATTED])
    for p, (_, fmt) in zip(params, FORMATTED):
        p.data = torch_npu.npu_format_cast(p.data, fmt)
        assert torch_npu.get_npu_format(p) == fmt
    return params


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_private_formats_are_kept_and_slots_sized_by_storage_size(device, private_formats, half: bool) -> None:
    torch_npu = private_formats
    dtype = torch.float16 if half else torch.float32
    params = _formatted_params(device, torch_npu, dtype)
    sizes = [torch_npu.get_storage_size(p) for p in params]
    assert any(size > p.numel() for size, p in zip(sizes, params)), "no padded format: the test proves nothing"
    theirs = copies(params, torch_npu)
    optimizer = FusedSGD(params, **HP)
    run_fixed(optimizer, params, 6)
    run_fixed(torch_sgd(theirs, **HP), theirs, 6)

    for p, (_, fmt), size in zip(params, FORMATTED, sizes):
        if fmt != ND:
            assert torch_npu.get_npu_format(p) == fmt, "format kept in the flat buffer"
            assert torch_npu.get_npu_format(p.grad) == fmt, "the ND gradient was cast to the parameter's format"
            assert torch_npu.get_npu_format(optimizer.state[p]["momentum_buffer"]) == fmt
            assert torch_npu.get_storage_size(p) == size
    (bucket,) = optimizer._layout.buckets
    for slot, (_, fmt), size in zip(bucket.plan.slots, FORMATTED, sizes):
        offset_bytes = slot.param.data_ptr() - bucket.params.data_ptr()
        assert offset_bytes == slot.offset * bucket.params.element_size() and offset_bytes % 512 == 0
        assert slot.numel == (slot.param.numel() if fmt == ND else size)
    tolerance = FIXED_RTOL if not half else 6 * torch.finfo(torch.float16).eps
    assert max_error(params, theirs) <= tolerance


@pytest.mark.parametrize("model_kind", ["convnet", "mlp"])
@pytest.mark.parametrize("cls", [FusedSGD, NpuFusedSGD], ids=lambda cls: cls.__name__)
def test_training_with_torch_npu_formats_matches_torch(device, private_formats, model_kind: str, cls) -> None:
    torch_npu = private_formats
    formats: dict[str, int] = {}

    def cast(factory):
        def make(model):
            formats.update(cast_like_torch_npu(model, torch_npu))
            return factory(model)

        return make

    pair = train_pair(
        cast(lambda model: torch_sgd(model.parameters(), **HP)),
        cast(lambda model: cls(model.parameters(), **HP)),
        device,
        model_kind=model_kind,
    )
    pair.assert_parity()
    for name, p in pair.model_b.named_parameters():
        assert torch_npu.get_npu_format(p) == formats.get(name, torch_npu.get_npu_format(p)), name
        if name in formats:
            assert torch_npu.get_npu_format(pair.optimizer_b.state[p]["momentum_buffer"]) == formats[name], name


def test_clip_grad_norm_fused_ignores_the_padding(device, private_formats) -> None:
    """Padding elements of a private-format slot hold zeros in the flat gradient, so the fused norm
    is torch's norm over the parameters' gradients."""
    torch_npu = private_formats
    params = _formatted_params(device, torch_npu)
    optimizer = FusedSGD(params, **HP)
    run_fixed(optimizer, params, 1)
    for p, grad in zip(params, [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for p in params]):
        p.grad = grad.to(device)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.detach().cpu().flatten() for p in params]))
    total = optimizer.clip_grad_norm_fused_(max_norm=1e9)
    assert abs(total.item() - expected.item()) <= 1e-5 * expected.item()
