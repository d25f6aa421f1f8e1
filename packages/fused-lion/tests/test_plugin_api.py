"""Size as the measure of the plugin API: fused-lion's own modules (optimizer class, hyperparameter
model, hooks; kernels and the reference apart) are at most 150 lines of code and use no private
name of fused-core."""

from __future__ import annotations

from fused_lion import c_kernel, hyperparams, kernels, optimizer, plugin, reference
from fused_testing.plugin_size import code_lines, private_core_names


def test_the_plugin_is_at_most_150_lines_of_code() -> None:
    assert code_lines(optimizer, hyperparams, plugin) <= 150


def test_no_private_name_of_fused_core() -> None:
    assert private_core_names(optimizer, hyperparams, plugin, kernels, c_kernel, reference) == []
