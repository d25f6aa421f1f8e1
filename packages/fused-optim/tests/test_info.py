"""``fused-optim info``: the environment report for bug reports, as text and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_core import registry
from fused_optim import info
from fused_optim.cli import main


@pytest.fixture(scope="module")
def report() -> dict:
    return info.gather(["fp32", "bf16"])


def _sgd_rows(report: dict) -> list[dict]:
    """The report's rows for SGD's kernel (other plugins' tests may have registered more kernels)."""
    return [row for row in report["launchers"] if row["kernel"] == "sgd"]


def test_json_holds_versions_devices_native_plugins_and_launchers(tmp_path: Path) -> None:
    path = tmp_path / "info.json"
    assert main(["info", "--dtype", "fp32", "bf16", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["torch"]["version"] == torch.__version__
    assert {"fused-core", "fused-sgd", "fused-adam", "fused-testing", "fused-optim"} <= set(record["packages"])
    assert record["packages"]["fused-adam"]["version"] is not None  # a dependency of fused-optim
    assert record["packages"]["fused-optim"]["version"] == "0.1.0"
    assert record["devices"]["cpu"]["cores"] >= 1
    assert record["native"]["cache_dir"] and {lib["module"] for lib in record["native"]["libraries"]} >= {
        "fused_core.gradients",
        "fused_core.grad_norm",
        "fused_sgd.kernels",
    }
    assert "sgd" in {o["name"] for o in record["optimizers"]}
    assert any(p["module"] == "fused_sgd.plugin" for p in record["plugins"])
    rows = {(row["kernel"], row["device"], row["dtype"]) for row in record["launchers"]}
    assert rows >= {("sgd", "cpu", "fp32"), ("sgd", "cpu", "bf16")}


def test_each_row_names_the_step_launcher_and_why_the_others_lost(report: dict) -> None:
    for row in _sgd_rows(report):
        flat = row["candidates"]["sgd"]
        assert sum(verdict["serves"] for verdict in flat) == 1
        assert all(verdict["reason"] for verdict in flat)
        serving = next(v["launcher"] for v in [*row["candidates"]["sgd[segments]"], *flat] if v["serves"])
        assert row["step_launcher"] in {v["launcher"] for v in [*row["candidates"]["sgd[segments]"], *flat]}
        assert serving
        cuda_only = [v for v in flat if v["device_type"] == "cuda"]
        assert cuda_only and all(v["reason"] == "registered for cuda only" for v in cuda_only)


def test_the_step_launcher_is_the_one_the_optimizer_uses(report: dict) -> None:
    """What info says serves is what FusedSGD.launchers() reports after a real step."""
    from fused_sgd import FusedSGD

    for row in _sgd_rows(report):
        dtype = info.DTYPES[row["dtype"]]
        param = torch.nn.Parameter(torch.ones(8, dtype=dtype))
        optimizer = FusedSGD([param], lr=0.1, momentum=0.9)
        param.grad = torch.ones_like(param)
        optimizer.step()
        used = optimizer.launchers()[(torch.device("cpu"), dtype)]
        assert row["step_launcher"].rsplit(".", 1)[-1] == used


def test_explain_agrees_with_resolve() -> None:
    registry.optimizers()
    kernels = registry.kernels
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        verdicts = kernels.explain("sgd", torch.device("cpu"), dtype)
        (serving,) = [v for v in verdicts if v.serves]
        launcher = kernels.resolve("sgd", torch.device("cpu"), dtype)
        assert serving.launcher == f"{launcher.__module__}.{launcher.__qualname__}"
    assert kernels.explain("no-such-kernel", torch.device("cpu"), torch.float32) == []


def test_text_report(report: dict) -> None:
    text = info.format_report(report)
    for label in ("python", "torch", "packages", "devices", "native", "plugins", "optimizers", "launchers:"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    assert "sgd on cpu, fp32: " in text and "sgd on cpu, bf16: " in text
    assert "C compiler: " in text and "cache: " in text
    assert "registered for cuda only" in text


def test_info_never_imports_torch_npu() -> None:
    """In a fresh process (nothing else imported it): torch_npu is looked up, never imported."""
    code = (
        "import sys, json\n"
        "from fused_optim import info\n"
        "report = info.gather(['fp32'])\n"
        "print(json.dumps({'imported': 'torch_npu' in sys.modules, 'npu': report['devices']['npu']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] is False
    assert result["npu"]["torch_npu_imported"] is False


def test_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--dtype", "fp64", "--json", "-"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [row["dtype"] for row in _sgd_rows(record)] == ["fp64"]
