"""Size as the measure of the plugin API: fused-rmsprop's own modules (optimizer classes, torch_npu
names, hyperparameter models, hooks; kernels apart) are at most 150 lines of code per optimizer (three:
RMSprop, RMSpropTF, Adadelta) and use no private name of fused-core."""

from __future__ import annotations

from fused_rmsprop import c_kernel, c_launchers, hyperparams, kernels, npu, optimizer, plugin, reference
from fused_testing.plugin_size import code_lines, private_core_names

OPTIMIZERS = 3


def test_the_plugin_is_at_most_150_lines_of_code_per_optimizer() -> None:
    assert code_lines(optimizer, hyperparams, plugin, npu) <= 150 * OPTIMIZERS


def test_no_private_name_of_fused_core() -> None:
    assert private_core_names(optimizer, hyperparams, plugin, npu, kernels, reference, c_kernel, c_launchers) == []
