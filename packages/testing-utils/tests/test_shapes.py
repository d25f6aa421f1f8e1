"""Shape sets against published parameter totals, and the param/grad factories."""

from __future__ import annotations

import math

import pytest
import torch

from fused_testing.shapes import (
    SHAPE_SETS,
    bert_base_shapes,
    gpt2_small_shapes,
    make_grads,
    make_params,
    many_small_shapes,
    resnet50_shapes,
)


def _numel(shapes: list[torch.Size]) -> int:
    return sum(math.prod(s) for s in shapes)


# Published totals: torchvision's model card for ResNet-50 (25,557,032),
# HF BertModel bert-base-uncased with pooler (109,482,240), HF GPT-2 small with
# the tied LM head counted once (124,439,808).
@pytest.mark.parametrize(
    ("name", "numel", "count"),
    [
        ("resnet50", 25_557_032, 161),
        ("bert-base", 109_482_240, 199),
        ("gpt2-small", 124_439_808, 148),
        ("20k-small", 1_280_000, 20_000),
    ],
)
def test_published_totals(name: str, numel: int, count: int) -> None:
    shapes = SHAPE_SETS[name]()
    assert _numel(shapes) == numel
    assert len(shapes) == count
    assert all(isinstance(s, torch.Size) for s in shapes)


def test_landmark_shapes() -> None:
    resnet = resnet50_shapes()
    assert resnet[0] == torch.Size([64, 3, 7, 7])
    assert resnet[-2:] == [torch.Size([1000, 2048]), torch.Size([1000])]
    bert = bert_base_shapes()
    assert bert[:3] == [torch.Size([30522, 768]), torch.Size([512, 768]), torch.Size([2, 768])]
    assert torch.Size([3072, 768]) in bert and torch.Size([768, 3072]) in bert
    gpt2 = gpt2_small_shapes()
    assert gpt2[:2] == [torch.Size([50257, 768]), torch.Size([1024, 768])]
    assert gpt2.count(torch.Size([768, 2304])) == 12


def test_many_small_shapes() -> None:
    assert many_small_shapes(3, 5) == [torch.Size([5])] * 3


def test_make_params_is_reproducible_and_typed() -> None:
    shapes = [torch.Size([3, 4]), torch.Size([5]), torch.Size([2, 1, 3, 3])]
    a = make_params(shapes, dtype=torch.bfloat16, seed=7)
    b = make_params(shapes, dtype=torch.bfloat16, seed=7)
    c = make_params(shapes, dtype=torch.bfloat16, seed=8)
    assert [p.shape for p in a] == shapes
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in a)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # the seed fixes the values independently of dtype (up to rounding)
    f32 = make_params(shapes, seed=7, requires_grad=False)
    assert not f32[0].requires_grad
    assert torch.equal(f32[1].to(torch.bfloat16), a[1])


def test_make_grads_match_params_and_differ_from_them() -> None:
    params = make_params([torch.Size([8, 8]), torch.Size([8])], dtype=torch.float16)
    grads = make_grads(params)
    assert [(g.shape, g.dtype, g.device) for g in grads] == [(p.shape, p.dtype, p.device) for p in params]
    assert not any(g.requires_grad for g in grads)
    assert not torch.equal(grads[0], params[0].detach())
    assert all(torch.equal(x, y) for x, y in zip(grads, make_grads(params)))
    assert not torch.equal(make_grads(params, seed=2)[1], grads[1])
