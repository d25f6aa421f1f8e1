"""Discovery through the ``fused_optim`` entry-point group, in a fresh interpreter.

``tmp_path`` holds an installed-looking distribution (a ``.dist-info`` folder with an
``entry_points.txt``) and its plugin module; ``stubs`` holds a stand-in ``torch_npu``
package, so that importing torch_npu would succeed and leave a trace in ``sys.modules``
(the real one is not installed here: without the stand-in, "torch_npu was not imported"
could not fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_SOURCE = '''
"""A tiny fused-optim plugin: plain gradient descent, p -= lr * g."""
from pydantic import BaseModel
from torch.optim.optimizer import required

import fused_core
from fused_core.hyperparams import LearningRate


class DescentHyperparams(BaseModel):
    lr: LearningRate


class FakeDescent(fused_core.FusedOptimizer):
    name = "fake_descent"
    hyperparameters = DescentHyperparams
    kernel = "fake_descent"

    def __init__(self, params, lr=required):
        super().__init__(params, dict(lr=lr))


def descent(params, grads, state, hp, first_step):
    params.sub_(grads * float(hp["lr"]))


@fused_core.hookimpl
def register_optimizers(register):
    register(FakeDescent)


@fused_core.hookimpl
def register_kernels(register):
    register("fake_descent", "*", descent)
'''

# Steps the fake optimizer once; its relative error against p - lr * g computed in float64.
CHECK = """
import json, sys
import torch
import fused_core

def step_error():
    generator = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000, generator=generator))
    g = torch.randn(3000, generator=generator)
    expected = p.detach().double() - 0.25 * g.double()
    p.grad = g.clone()
    fused_core.create_optimizer("fake_descent", [p], lr=0.25).step()
    return ((p.detach().double() - expected).abs().max() / expected.abs().max()).item()
"""

AUTOLOAD = """
names = fused_core.available_optimizers()
print(json.dumps({
    "names": names,
    "entry_point_name": fused_core.registry.manager.get_plugin("fake") is not None,
    "step_error": step_error(),
    "torch_npu": "torch_npu" in sys.modules,
}))
"""

DISABLED = """
names = fused_core.available_optimizers()
npu_before = "torch_npu" in sys.modules
registered = fused_core.register_plugin("fake_fused_plugin")
after = fused_core.available_optimizers()
error = step_error()
import fused_core.backends.npu  # the control: the stand-in torch_npu is importable and gets seen
print(json.dumps({
    "names": names, "torch_npu": npu_before, "registered": registered, "after": after,
    "step_error": error, "control": "torch_npu" in sys.modules,
}))
"""


@pytest.fixture
def plugin_path(tmp_path: Path) -> str:
    (tmp_path / "fake_fused_plugin.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "fake_fused_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-fused-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[fused_optim]\nfake = fake_fused_plugin\n")
    stubs = tmp_path / "stubs" / "torch_npu"
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text('"""Stand-in for torch_npu: importing it only leaves a trace."""\n')
    return os.pathsep.join([str(tmp_path), str(tmp_path / "stubs")])


def _run(script: str, pythonpath: str, *, disable: bool) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = pythonpath
    if disable:
        env["FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHECK + script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_entry_point_plugin_is_discovered(plugin_path: str) -> None:
    result = _run(AUTOLOAD, plugin_path, disable=False)
    assert "fake_descent" in result["names"]
    assert result["entry_point_name"], "registered under its entry-point name"
    assert result["step_error"] <= 1e-6  # the kernel registered through the entry point runs
    assert not result["torch_npu"], "importing fused_core (and autoloading plugins) imported torch_npu"


def test_autoload_can_be_disabled_and_plugins_registered_explicitly(plugin_path: str) -> None:
    result = _run(DISABLED, plugin_path, disable=True)
    assert "fake_descent" not in result["names"]
    assert not result["torch_npu"], "importing fused_core imported torch_npu"
    assert result["registered"] == "fake_fused_plugin"
    assert "fake_descent" in result["after"]
    assert result["step_error"] <= 1e-6
    assert result["control"], "the torch_npu stand-in was not importable, so the check above proves nothing"


THREADS = """
import threading
barrier = threading.Barrier(8)
errors, names = [], []

def build(index):
    barrier.wait()
    try:
        if index % 2:
            names.append(fused_core.register_plugin("fake_fused_plugin"))
        else:
            names.append(step_error() <= 1e-6 and "stepped")
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")

threads = [threading.Thread(target=build, args=(index,)) for index in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"errors": errors, "names": sorted(set(names)),
                  "plugins": sorted(name for name, _ in fused_core.registry.manager.list_name_plugin())}))
"""


@pytest.mark.parametrize("attempt", range(2))
def test_threads_building_the_first_optimizer_at_once(plugin_path: str, attempt: int) -> None:
    """Eight threads of a fresh process register the plugin or build its optimizer at once: the
    plugin is registered once, under its entry-point name, and every thread succeeds (the report:
    'Plugin already registered under a different name' in 13 of 20 processes)."""
    result = _run(THREADS, plugin_path, disable=False)
    assert result["errors"] == []
    assert result["names"] == ["fake", "stepped"]
    assert result["plugins"].count("fake") == 1 and "fake_fused_plugin" not in result["plugins"]
