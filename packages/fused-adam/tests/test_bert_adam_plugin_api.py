"""Size as the measure of the plugin API, for BertAdam apart from Adam: its optimizer classes and
hyperparameter model (its reference and kernels apart; its two registrations are in plugin.py,
counted with Adam's) are at most 150 lines of code and use no private name of fused-core."""

from __future__ import annotations

from fused_adam import bert_adam, bert_hyperparams, bert_kernels, bert_reference
from fused_testing.plugin_size import code_lines, private_core_names


def test_bert_adam_is_at_most_150_lines_of_code() -> None:
    assert code_lines(bert_adam, bert_hyperparams) <= 150


def test_no_private_name_of_fused_core() -> None:
    assert private_core_names(bert_adam, bert_hyperparams, bert_kernels, bert_reference) == []
