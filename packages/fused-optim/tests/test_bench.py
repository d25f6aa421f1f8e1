"""``fused-optim bench`` end to end on tiny shape sets: structure and arithmetic, never timings."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from fused_optim.cli import main

from fused_core import grad_norm, registry
from fused_testing import shapes

TINY_SETS = {
    "tiny": lambda: [torch.Size([30, 20]), torch.Size([20]), torch.Size([5, 3, 3, 3])],
    "tiny-many": lambda: shapes.many_small_shapes(64, 8),
}
DTYPES = ["fp32", "bf16"]
ROUNDS = 3
OPS = {
    "step": {"fused_sgd", "torch_forloop", "torch_foreach", "torch_fused"},
    "zero_grad": {"fused_sgd", "torch_forloop", "torch_foreach", "torch_fused"},
    "clip": {"fused_sgd", "torch_foreach", "torch_forloop"},
}
ACCESSES = {"step": 5, "zero_grad": 1, "clip": 3}
QUICK_PROBE = ["--bandwidth-mib", "16"]  # the default 256 MiB probe costs seconds; its size is not under test


@pytest.fixture
def tiny_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, make in TINY_SETS.items():
        monkeypatch.setitem(shapes.SHAPE_SETS, name, make)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One bench run shared by the tests below: its JSON, its plot and its table."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--sets", *TINY_SETS, "--dtype", *DTYPES, "--rounds", str(ROUNDS), *QUICK_PROBE]
    argv += ["--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, make in TINY_SETS.items():
            monkeypatch.setitem(shapes.SHAPE_SETS, name, make)
        stdout = out / "stdout.txt"
        with open(stdout, "w") as capture:
            monkeypatch.setattr(sys, "stdout", capture)
            assert main(argv) == 0
    return json.loads((out / "bench.json").read_text()), out / "bench.png", stdout.read_text()


def _entries(result: dict):
    for run in result["runs"]:
        for op, data in run["ops"].items():
            for key, entry in data["competitors"].items():
                yield run, op, key, entry


def test_json_has_every_set_dtype_op_and_competitor(bench_run) -> None:
    result, _, _ = bench_run
    assert {(run["set"], run["dtype"]) for run in result["runs"]} == {(s, d) for s in TINY_SETS for d in DTYPES}
    limit = result["bandwidth_limit"]
    assert [probe["when"] for probe in limit["probes"]] == ["start"] + [
        f"after {run['set']} {run['dtype']}" for run in result["runs"]
    ]
    assert limit["gbps"] == max(probe["gbps"] for probe in limit["probes"]) > 0
    for run in result["runs"]:
        assert run["tensors"] == len(TINY_SETS[run["set"]]())
        assert run["unavailable"] == {}
        assert {op: set(data["competitors"]) for op, data in run["ops"].items()} == OPS
        assert set(run["competitors"]) == OPS["step"]
        assert all(entry["first_step_s"] > 0 for entry in run["competitors"].values())
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[run["dtype"]]
        assert (
            run["fused_kernels"]["step"] == registry.kernels.entry("sgd", torch.device("cpu"), dtype).launcher.__name__
        )
        assert (run["fused_kernels"]["clip"] == "torch ops") != grad_norm.serves(torch.device("cpu"), dtype)
        check = run["staleness_check"]
        assert check["current"] is True and check["median_s"] > 0 and check["percent_of_step"] > 0
    for _, _, _, entry in _entries(result):
        assert len(entry["times_s"]) == ROUNDS and all(t > 0 for t in entry["times_s"])


def test_ratios_and_bandwidth_follow_from_the_times(bench_run) -> None:
    result, _, _ = bench_run
    limit = result["bandwidth_limit"]["gbps"]
    for run, op, key, entry in _entries(result):
        assert run["ops"][op]["bytes"] == ACCESSES[op] * run["numel"] * run["itemsize"]
        assert entry["median_s"] == pytest.approx(statistics.median(entry["times_s"]))
        assert entry["gbps"] == pytest.approx(run["ops"][op]["bytes"] / entry["median_s"] / 1e9)
        assert entry["percent_of_limit"] == pytest.approx(100 * entry["gbps"] / limit)
        assert entry["x_of_floor"] == pytest.approx(100 / entry["percent_of_limit"])
        if key == "fused_sgd":
            assert "vs_fused" not in entry
            continue
        fused = run["ops"][op]["competitors"]["fused_sgd"]["times_s"]
        ratios = entry["vs_fused"]["per_round"]
        assert ratios == pytest.approx([theirs / ours for theirs, ours in zip(entry["times_s"], fused)])
        assert entry["vs_fused"]["median"] == pytest.approx(statistics.median(ratios))


def test_every_competitor_did_the_same_work(bench_run) -> None:
    result, _, _ = bench_run
    for run in result["runs"]:
        steps = {key: entry["steps"] for key, entry in run["competitors"].items()}
        assert set(steps.values()) == {3 + ROUNDS}  # three in the warm-up, then one per round
        assert run["stale_fused_steps"]["rounds"] == 0  # timed FusedSGD steps took the hot path
        if run["dtype"] == "fp32":
            assert run["competitors"]["fused_sgd"]["max_abs_diff_vs_forloop"] < 1e-4


def test_prints_a_markdown_table(bench_run) -> None:
    _, _, table = bench_run
    assert "| set | dtype | competitor | median | vs FusedSGD | GB/s | % of limit | of floor |" in table
    for name in TINY_SETS:
        assert f"| {name} | bf16 | torch SGD foreach |" in table
    assert "clip_grad_norm_(foreach=False)" in table and "bandwidth limit:" in table


def test_plot_writes_a_png(bench_run) -> None:
    _, png, _ = bench_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_to_stdout_keeps_the_table_on_stderr(tiny_sets, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sets", "tiny", "--dtype", "fp32", "--rounds", "1", *QUICK_PROBE, "--json", "-"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [run["set"] for run in result["runs"]] == ["tiny"]
    assert "| tiny | fp32 | FusedSGD |" in captured.err


def test_distributed_times_both_methods_per_set(tiny_sets, tmp_path: Path) -> None:
    out = tmp_path / "distributed.json"
    argv = ["bench", "--distributed", "2", "--sets", *TINY_SETS, "--rounds", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "distributed" and result["settings"]["ranks"] == 2
    assert set(result["results"]) == set(TINY_SETS)  # shapes resolved in the parent reach the ranks
    for measured in result["results"].values():
        assert {"local", "all_reduce_grads", "ddp", "ddp+torch"} <= set(measured)
        assert measured["all_reduce_grads"]["sync_ms"] > 0 and measured["ddp"]["step_ms"] > 0


def test_distributed_needs_two_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--distributed", "1"])
    assert exit_info.value.code == 2
    assert "at least 2 ranks" in capsys.readouterr().err


def test_unknown_set_is_an_error_naming_the_known_sets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sets", "resnet51"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'resnet51'" in error and "resnet50" in error and "20k-small" in error


def test_plot_without_matplotlib_fails_before_benchmarking(
    tiny_sets, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["bench", "--sets", "tiny", "--plot", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "fused-optim[plot]" in captured.err and "bandwidth limit" not in captured.out
    assert not (tmp_path / "x.png").exists()


def test_unavailable_device_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda", "--sets", "20k-small"]) == 2
    assert "--device cuda" in capsys.readouterr().err
