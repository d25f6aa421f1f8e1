"""fused-sgd is found through the entry-point group `fused_optim`, not by importing it by name."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch


def _run(code: str, **env: str) -> str:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True
    ).stdout


def test_entry_point_is_declared() -> None:
    (sgd,) = [ep for ep in entry_points(group="fused_optim") if ep.name == "sgd"]
    assert sgd.value == "fused_sgd.plugin"


def test_discovered_without_importing_fused_sgd() -> None:
    out = _run(
        "import sys, fused_core; assert 'fused_sgd' not in sys.modules; "
        "print(fused_core.available_optimizers()); print('torch_npu' in sys.modules)"
    )
    available, npu_imported = out.split("\n")[:2]
    assert "'sgd'" in available and npu_imported == "False"  # other installed plugins (fused-adam) may list too


def test_autoload_can_be_disabled() -> None:
    out = _run(
        "import fused_core; print(fused_core.available_optimizers()); "
        "fused_core.register_plugin('fused_sgd.plugin'); print(fused_core.available_optimizers())",
        FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD="1",
    )
    assert out.split("\n")[:2] == ["[]", "['sgd']"]


def test_create_optimizer_builds_fused_sgd() -> None:
    import fused_core
    from fused_sgd import FusedSGD

    params = [torch.nn.Parameter(torch.randn(100, 50))]
    opt = fused_core.create_optimizer("sgd", params, lr=0.1, momentum=0.9)
    assert type(opt) is FusedSGD
    assert opt.param_groups[0]["momentum"] == 0.9


def test_unknown_name_lists_available() -> None:
    import fused_core

    with pytest.raises(fused_core.UnknownOptimizerError, match="unknown optimizer 'no-such'; available: .*sgd"):
        fused_core.create_optimizer("no-such", [torch.nn.Parameter(torch.randn(3))], lr=0.1)
