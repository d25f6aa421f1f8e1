"""Test helpers shared by the fused-optim packages.

- :mod:`fused_testing.reference`: a float64 SGD written from the math.
- :mod:`fused_testing.shapes`: parameter shape sets of real architectures.
- :mod:`fused_testing.parity`: train two optimizers side by side and compare.
- :mod:`fused_testing.native`: fail a C-kernel test where a compiler is but the kernel did not load.
"""

from fused_testing.parity import (
    ParityResult,
    assert_parity,
    make_batches,
    make_model,
    train_side_by_side,
)
from fused_testing.reference import ReferenceSGD, relative_error, sgd_reference_step
from fused_testing.shapes import (
    SHAPE_SETS,
    bert_base_shapes,
    gpt2_small_shapes,
    make_grads,
    make_params,
    many_small_shapes,
    resnet50_shapes,
)

__all__ = [
    "SHAPE_SETS",
    "ParityResult",
    "ReferenceSGD",
    "assert_parity",
    "bert_base_shapes",
    "gpt2_small_shapes",
    "make_batches",
    "make_grads",
    "make_model",
    "make_params",
    "many_small_shapes",
    "relative_error",
    "resnet50_shapes",
    "sgd_reference_step",
    "train_side_by_side",
]
