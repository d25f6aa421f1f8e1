"""Size as the measure of the plugin API: fused-lamb's own modules (optimizer classes, hyperparameter
models, hooks, torch_npu names; kernels apart) are at most 150 lines of code per optimizer (two
here: Lamb and AdamP) and use no private name of fused-core."""

from __future__ import annotations

import ast
import inspect

from fused_lamb import (
    adamp_kernels,
    c_kernel,
    hyperparams,
    lamb_kernels,
    layerwise,
    npu,
    optimizer,
    plugin,
    reference,
)
from fused_testing.plugin_size import code_lines, private_core_names

OPTIMIZERS = 2  # Lamb and AdamP


def test_the_plugin_is_at_most_150_lines_of_code_per_optimizer() -> None:
    assert code_lines(optimizer, hyperparams, plugin, npu) <= 150 * OPTIMIZERS


def test_no_private_name_of_fused_core() -> None:
    modules = (optimizer, hyperparams, plugin, npu, lamb_kernels, adamp_kernels, layerwise, c_kernel)
    assert private_core_names(*modules) == []


def test_the_references_owe_nothing_to_fused_core() -> None:
    """The per-tensor references are plain torch.optim optimizers: an independent check."""
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(ast.parse(inspect.getsource(reference)))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not any((name or "").startswith(("fused_core", "fused_lamb", ".")) for name in imported), imported
