"""Parameter shape sets of real architectures, for benchmarks and stress tests.

Each set is derived from the architecture's definition (layer by layer, in the
order ``named_parameters()`` yields them in the reference implementation), not
copied from a table, so the published parameter totals are an independent
check:

=============  ===========================================  ==============  =======
name           source                                       elements        tensors
=============  ===========================================  ==============  =======
resnet50       torchvision ``resnet50()``                   25,557,032      161
bert-base      HF ``BertModel`` (bert-base-uncased, pooler) 109,482,240     199
gpt2-small     HF ``GPT2LMHeadModel`` (lm_head tied to wte) 124,439,808     148
20k-small      20,000 tensors of 64 elements                1,280,000       20,000
=============  ===========================================  ==============  =======

Linear weights use torch's ``(out_features, in_features)`` layout; GPT-2's
``Conv1D`` weights use HF's ``(in_features, out_features)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "SHAPE_SETS",
    "bert_base_shapes",
    "gpt2_small_shapes",
    "make_grads",
    "make_params",
    "many_small_shapes",
    "resnet50_shapes",
]

Shapes = list[torch.Size]


def _linear(in_features: int, out_features: int) -> Shapes:
    return [torch.Size([out_features, in_features]), torch.Size([out_features])]


def _norm(features: int) -> Shapes:
    """BatchNorm / LayerNorm affine parameters: weight and bias."""
    return [torch.Size([features]), torch.Size([features])]


def _conv(in_channels: int, out_channels: int, kernel: int) -> Shapes:
    """A bias-free convolution (every ResNet conv is followed by BatchNorm)."""
    return [torch.Size([out_channels, in_channels, kernel, kernel])]


def resnet50_shapes() -> Shapes:
    """torchvision ResNet-50 (He et al., 2015, "Deep Residual Learning").

    A 7x7 stem, four stages of [3, 4, 6, 3] bottleneck blocks (1x1 -> 3x3 ->
    1x1, expansion 4, a 1x1 projection on each stage's first block), then a
    2048 -> 1000 classifier.
    """
    shapes = _conv(3, 64, 7) + _norm(64)
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_channels = width * 4
        for block in range(blocks):
            shapes += _conv(in_channels, width, 1) + _norm(width)
            shapes += _conv(width, width, 3) + _norm(width)
            shapes += _conv(width, out_channels, 1) + _norm(out_channels)
            if block == 0:
                shapes += _conv(in_channels, out_channels, 1) + _norm(out_channels)
            in_channels = out_channels
    return shapes + _linear(2048, 1000)


def bert_base_shapes() -> Shapes:
    """BERT-base uncased (Devlin et al., 2018) encoder with pooler.

    Vocabulary 30522, 512 positions, 2 token types, hidden 768, 12 layers of
    self-attention (q, k, v, output projection) and a 3072-wide feed-forward
    block, each sub-block followed by LayerNorm; a 768 -> 768 pooler.
    """
    hidden, ffn = 768, 3072
    shapes = [torch.Size([30522, hidden]), torch.Size([512, hidden]), torch.Size([2, hidden])]
    shapes += _norm(hidden)
    for _ in range(12):
        for _projection in ("query", "key", "value"):
            shapes += _linear(hidden, hidden)
        shapes += _linear(hidden, hidden) + _norm(hidden)  # attention output
        shapes += _linear(hidden, ffn)  # intermediate
        shapes += _linear(ffn, hidden) + _norm(hidden)  # output
    return shapes + _linear(hidden, hidden)  # pooler


def _conv1d(in_features: int, out_features: int) -> Shapes:
    """GPT-2's ``Conv1D``: a linear layer stored as (in, out)."""
    return [torch.Size([in_features, out_features]), torch.Size([out_features])]


def gpt2_small_shapes() -> Shapes:
    """GPT-2 small, 124M (Radford et al., 2019).

    Vocabulary 50257, 1024 positions, width 768, 12 pre-LayerNorm blocks of
    fused q/k/v attention (768 -> 2304), its projection and a 3072-wide MLP,
    then a final LayerNorm. The LM head is tied to the token embedding, so
    it owns no tensor of its own.
    """
    width = 768
    shapes = [torch.Size([50257, width]), torch.Size([1024, width])]
    for _ in range(12):
        shapes += _norm(width) + _conv1d(width, 3 * width) + _conv1d(width, width)
        shapes += _norm(width) + _conv1d(width, 4 * width) + _conv1d(4 * width, width)
    return shapes + _norm(width)


def many_small_shapes(n: int = 20000, numel: int = 64) -> Shapes:
    """``n`` one-dimensional tensors of ``numel`` elements: launch overhead dominates."""
    return [torch.Size([numel])] * n


SHAPE_SETS: dict[str, Callable[[], Shapes]] = {
    "resnet50": resnet50_shapes,
    "bert-base": bert_base_shapes,
    "gpt2-small": gpt2_small_shapes,
    "20k-small": many_small_shapes,
}


def _standard_normal(shapes: Sequence[torch.Size], seed: int) -> list[Tensor]:
    # Drawn on the CPU in float32 from one generator, then cast by the caller,
    # so a seed gives the same values (up to rounding) on every device and dtype.
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def make_params(
    shapes: Sequence[torch.Size],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    requires_grad: bool = True,
) -> list[torch.nn.Parameter]:
    """Standard-normal parameters with the given shapes, reproducible from ``seed``."""
    return [
        torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=requires_grad)
        for t in _standard_normal(shapes, seed)
    ]


def make_grads(params: Sequence[Tensor], seed: int = 1) -> list[Tensor]:
    """Fresh standard-normal tensors matching each param's shape, dtype and device."""
    draws = _standard_normal([p.shape for p in params], seed)
    return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(draws, params, strict=True)]
