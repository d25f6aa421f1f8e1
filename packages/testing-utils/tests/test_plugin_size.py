"""fused_testing.plugin_size counts only code lines and finds fused-core's private names."""

from __future__ import annotations

import importlib.util
import textwrap

from fused_testing.plugin_size import code_lines, private_core_names

SOURCE = '''
"""A module docstring
over two lines."""

import torch  # a comment
from fused_core import FusedOptimizer
from fused_core.layout import _slices


class Plugin(FusedOptimizer):
    """A class docstring."""

    # a comment line

    def step(self):
        """A method docstring."""
        self._layout = None
        FusedOptimizer._drop_layout(self)
        return torch._fused_sgd_, self.__dict__
'''


def load(tmp_path):
    path = tmp_path / "plugin_under_count.py"
    path.write_text(textwrap.dedent(SOURCE))
    spec = importlib.util.spec_from_file_location("plugin_under_count", path)
    return importlib.util.module_from_spec(spec)  # read, not run: fused-core need not be installed


def test_counts_code_lines_only(tmp_path) -> None:
    # import x3, class, def, three statements
    assert code_lines(load(tmp_path)) == 8


def test_finds_private_core_names_and_not_torchs(tmp_path) -> None:
    found = private_core_names(load(tmp_path))
    assert "fused_core.layout._slices" in found
    assert any(name.endswith("self..._layout") for name in found)
    assert any(name.endswith("FusedOptimizer..._drop_layout") for name in found)
    assert not any("_fused_sgd_" in name or "__dict__" in name for name in found)
    assert len(found) == 3
