"""The documentation's example scripts run as shown."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("script", ["quickstart.py", "npu_fused_sgd.py"])
def test_example_runs(script: str) -> None:
    runpy.run_path(str(HERE / script), run_name="__main__")
