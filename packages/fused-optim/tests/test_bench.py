"""``fused-optim bench`` end to end on tiny shape sets: structure and arithmetic, never timings;
and the gradient hand-over of each mode, object by object."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from fused_core import grad_norm, gradients, registry
from fused_core.kernels import segments_kernel
from fused_optim.bench_measure import Competitor, Contest
from fused_optim.cli import main
from fused_testing import shapes

TINY_SETS = {
    "tiny": lambda: [torch.Size([30, 20]), torch.Size([20]), torch.Size([5, 3, 3, 3])],
    "tiny-many": lambda: shapes.many_small_shapes(64, 8),
}
DTYPES = ["fp32", "bf16"]
DTYPES_BY_NAME = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = 3
MODES = ["fresh", "bound"]
ALL = {"fused_sgd", "torch_forloop", "torch_foreach", "torch_fused"}
CLIP = {"fused_sgd", "torch_foreach", "torch_forloop"}
OPS = {
    "fresh": {"step": ALL, "zero_grad": ALL, "cycle": ALL},
    "bound": {"step": ALL, "zero_grad": ALL, "cycle": ALL, "clip": CLIP},
}
ACCESSES = {
    "fresh": {"step": 5, "zero_grad": 0, "cycle": 5},
    "bound": {"step": 5, "zero_grad": 1, "cycle": 6, "clip": 3},
}
WARMUP_STEPS = 2 + len(MODES)  # two cycles (build, second), then one per mode
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
    """(run, mode, op, key, entry) of every measured row."""
    for run in result["runs"]:
        for mode, measured in run["modes"].items():
            for op, data in measured["ops"].items():
                for key, entry in data["competitors"].items():
                    yield run, mode, op, key, entry


def test_json_has_every_set_dtype_op_and_competitor(bench_run) -> None:
    result, _, _ = bench_run
    assert {(run["set"], run["dtype"]) for run in result["runs"]} == {(s, d) for s in TINY_SETS for d in DTYPES}
    limit = result["bandwidth_limit"]
    assert [probe["when"] for probe in limit["probes"]] == ["start"] + [
        f"after {run['set']} {run['dtype']}" for run in result["runs"]
    ]
    assert limit["gbps"] == max(probe["gbps"] for probe in limit["probes"]) > 0
    assert result["schema"] == 2 and result["settings"]["grads"] == MODES
    for run in result["runs"]:
        assert run["tensors"] == len(TINY_SETS[run["set"]]())
        assert run["unavailable"] == {}
        assert list(run["modes"]) == MODES
        for mode, measured in run["modes"].items():
            assert {op: set(data["competitors"]) for op, data in measured["ops"].items()} == OPS[mode]
            assert measured["zero_grad_set_to_none"] is (mode == "fresh")
        assert set(run["competitors"]) == ALL
        assert all(entry["first_step_s"] > 0 for entry in run["competitors"].values())
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[run["dtype"]]
        cpu = torch.device("cpu")
        in_place = gradients.library() is not None and registry.kernels.find(segments_kernel("sgd"), cpu, dtype)
        expected = in_place or registry.kernels.entry("sgd", cpu, dtype).launcher
        assert run["fused_kernels"]["step"] == expected.__name__
        assert (run["fused_kernels"]["clip"] == "torch ops") != grad_norm.serves(torch.device("cpu"), dtype)
        check = run["staleness_check"]
        assert check["current"] is True and check["median_s"] > 0
        assert set(check["percent_of_step"]) == set(MODES) and all(v > 0 for v in check["percent_of_step"].values())


def test_both_modes_have_numbers_for_every_competitor(bench_run) -> None:
    result, _, _ = bench_run
    for _, _, _, _, entry in _entries(result):
        assert entry["rounds"] == ROUNDS
        assert len(entry["times_s"]) == ROUNDS and all(t > 0 for t in entry["times_s"])
        assert entry["median_s"] > 0 and entry["min_s"] > 0
    for run in result["runs"]:
        arrival = run["modes"]["fresh"]["arrival"]  # the autograd hand-over, once per round
        assert len(arrival["times_s"]) == ROUNDS and all(t > 0 for t in arrival["times_s"])
        assert arrival["median_s"] == pytest.approx(statistics.median(arrival["times_s"]))
        assert "arrival" not in run["modes"]["bound"]  # copied in place, outside any timing


def test_a_cycle_is_zero_grad_plus_step_of_the_same_round(bench_run) -> None:
    result, _, _ = bench_run
    for run in result["runs"]:
        for measured in run["modes"].values():
            ops = measured["ops"]
            for key, cycle in ops["cycle"]["competitors"].items():
                pairs = zip(ops["zero_grad"]["competitors"][key]["times_s"], ops["step"]["competitors"][key]["times_s"])
                assert cycle["times_s"] == pytest.approx([zero + step for zero, step in pairs])


def test_ratios_and_bandwidth_follow_from_the_times(bench_run) -> None:
    result, _, _ = bench_run
    limit = result["bandwidth_limit"]["gbps"]
    for run, mode, op, key, entry in _entries(result):
        data = run["modes"][mode]["ops"][op]
        assert data["bytes"] == ACCESSES[mode][op] * run["numel"] * run["itemsize"]
        assert entry["median_s"] == pytest.approx(statistics.median(entry["times_s"]))
        if data["bytes"] == 0:  # zero_grad(set_to_none=True) moves nothing: no bandwidth, no floor
            assert entry["gbps"] is entry["percent_of_limit"] is entry["x_of_floor"] is data["floor_s"] is None
        else:
            assert entry["gbps"] == pytest.approx(data["bytes"] / entry["median_s"] / 1e9)
            assert entry["percent_of_limit"] == pytest.approx(100 * entry["gbps"] / limit)
            assert entry["x_of_floor"] == pytest.approx(100 / entry["percent_of_limit"])
            assert entry["x_of_floor"] == pytest.approx(entry["median_s"] / data["floor_s"])
        if key == "fused_sgd":
            assert "vs_fused" not in entry
            continue
        fused = data["competitors"]["fused_sgd"]["times_s"]
        ratios = entry["vs_fused"]["per_round"]
        assert ratios == pytest.approx([theirs / ours for theirs, ours in zip(entry["times_s"], fused)])
        assert entry["vs_fused"]["median"] == pytest.approx(statistics.median(ratios))


def test_every_competitor_did_the_same_work(bench_run) -> None:
    result, _, _ = bench_run
    for run in result["runs"]:
        # Warm-up, one per mode and round, and one settling cycle per round: the rotated mode
        # order (fresh, bound), (bound, fresh), ... switches once within each round.
        assert {entry["settling_cycles"] for entry in run["competitors"].values()} == {ROUNDS}
        steps = {key: entry["steps"] for key, entry in run["competitors"].items()}
        assert set(steps.values()) == {WARMUP_STEPS + len(MODES) * ROUNDS + ROUNDS}
        assert run["modes"]["bound"]["stale_fused_steps"]["rounds"] == 0  # bound steps took the hot path
        if run["dtype"] == "fp32":
            assert run["competitors"]["fused_sgd"]["max_abs_diff_vs_forloop"] < 1e-4


def test_prints_a_markdown_table(bench_run) -> None:
    _, _, table = bench_run
    assert "| set | dtype | grads | competitor | zero_grad | step | cycle | zero_grad vs FusedSGD |" in table
    assert "| set | dtype | grads | zero_grad | step | cycle | gradient arrival | step of floor |" in table
    assert "| set | dtype | competitor | median | vs FusedSGD | GB/s | % of limit | of floor |" in table  # clipping
    for name in TINY_SETS:
        for mode in MODES:
            assert f"| {name} | bf16 | {mode} | torch SGD foreach |" in table
    assert "clip_grad_norm_(foreach=False)" in table and "bandwidth limit:" in table


def test_plot_writes_a_png(bench_run) -> None:
    _, png, _ = bench_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", MODES)
def test_grads_times_one_mode_and_json_to_stdout_keeps_the_table_on_stderr(
    tiny_sets, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    argv = ["bench", "--sets", "tiny", "--dtype", "fp32", "--rounds", "1", "--grads", mode, *QUICK_PROBE]
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [run["set"] for run in result["runs"]] == ["tiny"] and result["settings"]["grads"] == [mode]
    run = result["runs"][0]
    assert list(run["modes"]) == [mode] and set(run["modes"][mode]["ops"]) == set(OPS[mode])
    assert set(run["staleness_check"]["percent_of_step"]) == {mode}
    fused = run["competitors"]["fused_sgd"]
    assert fused["steps"] == 3 + 1 and fused["settling_cycles"] == 0  # warm-up: build, second, the mode's
    assert f"| tiny | fp32 | {mode} | FusedSGD |" in captured.err
    assert ("gradient clipping: not timed" in captured.err) == (mode == "fresh")


ADAMW_ACCESSES = {
    "fresh": {"step": 7, "zero_grad": 0, "cycle": 7},
    "bound": {"step": 7, "zero_grad": 1, "cycle": 8, "clip": 3},
}
ADAMW_ALL = {"fused_adamw", "torch_forloop", "torch_foreach", "torch_fused"}
ADAMW_LABELS = {
    "fused_adamw": "FusedAdamW",
    "torch_forloop": "torch AdamW for-loop",
    "torch_foreach": "torch AdamW foreach",
    "torch_fused": "torch AdamW fused",
}


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """``--optimizer adamw`` on the tiny set, both dtypes, two rounds: its JSON and its table."""
    out = tmp_path_factory.mktemp("bench-adamw")
    argv = ["bench", "--optimizer", "adamw", "--sets", "tiny", "--dtype", *DTYPES, "--rounds", "2", *QUICK_PROBE]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(shapes.SHAPE_SETS, "tiny", TINY_SETS["tiny"])
        with open(out / "stdout.txt", "w") as capture:
            monkeypatch.setattr(sys, "stdout", capture)
            assert main([*argv, "--json", str(out / "bench.json")]) == 0
    return json.loads((out / "bench.json").read_text()), (out / "stdout.txt").read_text()


def test_adamw_json_records_the_optimizer_its_competitors_and_its_floor(adamw_run) -> None:
    result, _ = adamw_run
    settings = result["settings"]
    assert (settings["optimizer"], settings["fused_optimizer"], settings["torch_optimizer"]) == (
        "adamw",
        "FusedAdamW",
        "torch.optim.AdamW",
    )
    assert settings["reference"] == "fused_adamw"
    assert settings["hyperparameters"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2}
    assert settings["accesses_per_element"] == ADAMW_ACCESSES
    assert [(run["set"], run["dtype"]) for run in result["runs"]] == [("tiny", dtype) for dtype in DTYPES]
    for run in result["runs"]:
        assert run["unavailable"] == {}
        assert {key: entry["label"] for key, entry in run["competitors"].items()} == ADAMW_LABELS
        assert isinstance(run["fused_kernels"]["step"], str) and run["fused_kernels"]["step"]
        assert run["staleness_check"]["current"] is True
        for mode, measured in run["modes"].items():
            expected = {op: ADAMW_ALL for op in ("step", "zero_grad", "cycle")}
            if mode == "bound":  # clipping is optimizer-independent, and timed for AdamW too
                expected["clip"] = {"fused_adamw", "torch_foreach", "torch_forloop"}
            assert {op: set(data["competitors"]) for op, data in measured["ops"].items()} == expected
            for op, data in measured["ops"].items():
                assert data["bytes"] == ADAMW_ACCESSES[mode][op] * run["numel"] * run["itemsize"]
                for key, entry in data["competitors"].items():
                    assert entry["rounds"] == 2 and all(t > 0 for t in entry["times_s"])
                    if data["bytes"]:
                        assert entry["x_of_floor"] == pytest.approx(entry["median_s"] / data["floor_s"])
                    if key == "fused_adamw":
                        assert "vs_fused" not in entry
                        continue
                    fused = data["competitors"]["fused_adamw"]["times_s"]
                    expected_ratios = [theirs / ours for theirs, ours in zip(entry["times_s"], fused)]
                    assert entry["vs_fused"]["per_round"] == pytest.approx(expected_ratios)
        steps = {entry["steps"] for entry in run["competitors"].values()}
        assert steps == {WARMUP_STEPS + len(MODES) * 2 + 2}  # every competitor did the same work
        if run["dtype"] == "fp32":
            assert run["competitors"]["fused_adamw"]["max_abs_diff_vs_forloop"] < 1e-5


def test_adamw_table_names_adamw_throughout(adamw_run) -> None:
    _, table = adamw_run
    assert (
        "10 rounds" not in table
        and "2 rounds, AdamW lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01" in table
    )
    assert "| set | dtype | grads | competitor | zero_grad | step | cycle | zero_grad vs FusedAdamW |" in table
    assert "| cycle of floor | torch AdamW fused / FusedAdamW (cycle) |" in table
    assert "FusedAdamW per training-loop cycle" in table
    assert "(fresh: step 7, cycle 7; bound: step 7, cycle 8)" in table
    for dtype in DTYPES:
        for mode in MODES:
            for label in ADAMW_LABELS.values():
                assert f"| tiny | {dtype} | {mode} | {label} |" in table
        assert f"| tiny | {dtype} | FusedAdamW.clip_grad_norm_fused_ |" in table
    assert "vs FusedAdamW: competitor time / FusedAdamW time" in table
    assert "SGD" not in table


def test_unknown_optimizer_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--optimizer", "no-such-optimizer"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --optimizer: invalid choice: 'no-such-optimizer'" in err and "'sgd'" in err and "'adamw'" in err


def test_adamw_without_fused_adam_fails_before_benchmarking(
    tiny_sets, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fused_adam", None)  # import fused_adam now fails
    assert main(["bench", "--optimizer", "adamw", "--sets", "tiny"]) == 2
    captured = capsys.readouterr()
    assert "pip install ./packages/fused-adam" in captured.err and "bandwidth limit" not in captured.out


def test_distributed_times_sgd_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--distributed", "2", "--optimizer", "adamw"]) == 2
    assert "--distributed times FusedSGD, not --optimizer adamw" in capsys.readouterr().err


def _record_cycles(competitor: Competitor, sources: list[torch.Tensor]) -> dict[str, list]:
    """Wrap the competitor's zero_grad and step (instance attributes, which the bench calls).
    Per zero_grad: its set_to_none, the .grad objects it left and whether they were all None or
    zero; per step: the .grad objects it was handed and whether they equalled ``sources``. The
    objects are kept alive, so their ids cannot be reused by later tensors."""
    optimizer = competitor.optimizer
    zero_grad, step = optimizer.zero_grad, optimizer.step
    log: dict[str, list] = {"set_to_none": [], "after_zero_grad": [], "cleared": [], "at_step": [], "equal": []}

    def recording_zero_grad(set_to_none: bool = True) -> None:
        zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in competitor.params]
        log["set_to_none"].append(set_to_none)
        log["after_zero_grad"].append(grads)
        log["cleared"].append(all(grad is None or not grad.any() for grad in grads))

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in competitor.params]
        log["at_step"].append(grads)
        log["equal"].append(all(grad is not None and torch.equal(grad, s) for grad, s in zip(grads, sources)))
        return step(*args, **kwargs)

    optimizer.zero_grad = recording_zero_grad  # type: ignore[method-assign]
    optimizer.step = recording_step  # type: ignore[method-assign]
    return log


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_hands_over_the_gradients_it_says(mode: str) -> None:
    """fresh: every cycle's zero_grad drops the gradients and every step gets new tensor objects
    (ids differ from the previous cycle's); bound: the same objects, zeroed, then refilled."""
    contest = Contest(TINY_SETS["tiny"](), torch.float32, torch.device("cpu"), seed=0, max_norm=1.0, modes=[mode])
    contest.warm_up()
    cycles = 3
    for key, competitor in contest.competitors.items():
        log = _record_cycles(competitor, contest.source_grads)
        for _ in range(cycles):
            contest.cycle(mode, competitor)
        assert log["set_to_none"] == [mode == "fresh"] * cycles, key
        assert log["cleared"] == log["equal"] == [True] * cycles, key  # cleared, then the shared gradients
        for left, handed in zip(log["after_zero_grad"], log["at_step"]):
            if mode == "fresh":
                assert all(grad is None for grad in left), key
            else:
                assert all(grad is now for grad, now in zip(left, handed)), key  # zeroed in place, refilled
            assert not {id(grad) for grad in handed} & {id(source) for source in contest.source_grads}, key
        for before, after in zip(log["at_step"], log["at_step"][1:]):
            same = [id(a) == id(b) for a, b in zip(before, after)]
            assert same == [mode == "bound"] * len(same), key


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


def test_unknown_grads_mode_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--grads", "stale"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'stale'" in capsys.readouterr().err


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


@pytest.mark.parametrize("device", ["cuda:0", "npu:1", "tpu", "cpu:0"])
def test_bench_takes_trains_device_syntax(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One --device syntax for every command: cuda:N is a device, not an argparse error."""
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device.startswith("npu") and "torch_npu" in sys.modules:
        pytest.skip("torch_npu is imported")
    assert main(["bench", "--device", device, "--sets", "20k-small"]) == 2
    err = capsys.readouterr().err
    if device in ("tpu", "cpu:0"):
        assert "expected cpu, cuda, cuda:N, npu or npu:N" in err
    else:
        assert f"--device {device.split(':')[0]}" in err and "invalid choice" not in err


def test_a_flavour_the_compared_class_lacks_is_reported_unavailable() -> None:
    """A compared class without ``fused`` (torch.optim.RMSprop, a per-tensor reference) is not run
    with ``fused=True``: the run says why instead."""
    import dataclasses

    from fused_optim.optimizers import SPECS

    spec = dataclasses.replace(SPECS["sgd"], flags=("foreach",))
    contest = Contest(TINY_SETS["tiny"](), torch.float32, torch.device("cpu"), seed=0, max_norm=1.0, spec=spec)
    assert set(contest.competitors) == {"fused_sgd", "torch_forloop", "torch_foreach"}
    assert contest.unavailable == {"torch_fused": "torch.optim.SGD has no fused implementation"}


def test_fsdp_needs_distributed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--fsdp"]) == 2
    assert "--fsdp needs --distributed N" in capsys.readouterr().err


def test_fsdp_names_its_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--distributed", "2", "--fsdp", "resnet50"]) == 2
    assert "no FSDP2 model 'resnet50'; choose from 1000-small, large" in capsys.readouterr().err


def test_fsdp_times_fused_sgd_against_torch_over_dtensors(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.json"
    argv = ["bench", "--distributed", "2", "--fsdp", "1000-small", "--rounds", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "fsdp" and result["settings"]["ranks"] == 2
    measured = result["results"]["1000-small"]
    assert measured["local_elements"] > 0 and measured["floor_ms"] > 0
    steps = measured["step_ms"]
    assert steps["fused"] > 0 and steps["torch"] > 0 and steps["torch foreach"] > 0
    assert steps["torch fused"] is None or steps["torch fused"] > 0  # None: torch has no DTensor rule (2.13)


def _torch_fused_sgd_moves(dtype: torch.dtype, shapes_: list[torch.Size]) -> bool:
    """Whether this torch's SGD(fused=True) updates every element of CPU parameters of these shapes
    and ``dtype`` (torch 2.13's leaves the vectorised part of fp16/bf16 ones where it was, every
    element but the remainder after the last full vector: pytorch/pytorch#191763)."""
    params = [torch.nn.Parameter(torch.ones(shape, dtype=dtype)) for shape in shapes_]
    for param in params:
        param.grad = torch.ones_like(param)
    torch.optim.SGD(params, lr=0.5, fused=True).step()
    return all(bool((param != 1).all()) for param in params)


def test_the_result_check_flags_exactly_the_competitors_that_skip_work(bench_run) -> None:
    result, _, table = bench_run
    for run in result["runs"]:
        check = run["result_check"]
        assert set(check["competitors"]) == ALL and check["baseline"] == "torch_forloop"
        wrong = {key for key, entry in check["competitors"].items() if entry["wrong"]}
        broken = not _torch_fused_sgd_moves(DTYPES_BY_NAME[run["dtype"]], TINY_SETS[run["set"]]())
        assert wrong == ({"torch_fused"} if broken else set()), (run["set"], run["dtype"], check)
        where = f"{run['set']} {run['dtype']}"
        assert (f"note: {where}: torch_fused gives wrong results" in table) == broken
        for mode in MODES:
            assert (f"| {run['set']} | {run['dtype']} | {mode} | torch SGD fused (wrong results) |" in table) == broken


class _SkipsEveryOther(torch.optim.SGD):
    """torch.optim.SGD that updates only every other parameter: the results are wrong."""

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        kept = [p.detach().clone() for p in self.param_groups[0]["params"]]
        super().step()
        with torch.no_grad():
            for index, (param, old) in enumerate(zip(self.param_groups[0]["params"], kept)):
                if index % 2:
                    param.copy_(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_result_check_against_float64(dtype: torch.dtype) -> None:
    """On fresh random parameters and gradients (ResNet-50's first tensors), FusedSGD and torch's
    for-loop and foreach SGD pass the check; an SGD that skips every other parameter fails it."""
    from fused_optim.bench_check import check_results
    from fused_sgd import FusedSGD

    hyper = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    base = shapes.make_params(shapes.SHAPE_SETS["resnet50"](), dtype=dtype, seed=7)
    grads = shapes.make_grads(base, seed=8)
    makers = {
        "fused": lambda params: FusedSGD(params, **hyper),
        "torch_forloop": lambda params: torch.optim.SGD(params, **hyper, foreach=False),
        "torch_foreach": lambda params: torch.optim.SGD(params, **hyper, foreach=True),
        "skips": lambda params: _SkipsEveryOther(params, **hyper, foreach=False),
    }
    check = check_results(
        list(makers),
        lambda key, params: makers[key](params),
        lambda params: torch.optim.SGD(params, **hyper, foreach=False),
        base,
        grads,
    )
    assert 0 < check["numel"] <= 1 << 20 and check["tensors"] > 1
    wrong = {key for key, entry in check["competitors"].items() if entry["wrong"]}
    assert wrong == {"skips"}, check
    assert check["competitors"]["skips"]["moved_fraction"] < 0.7 < check["competitors"]["fused"]["moved_fraction"]
    assert all(p.grad is None for p in base)  # the run's own parameters are not touched


class _Overflows(torch.optim.SGD):
    """torch.optim.SGD whose parameters end at infinity, as AdamW's fp16 for-loop's do (eps rounds to 0)."""

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        super().step()
        with torch.no_grad():
            for param in self.param_groups[0]["params"]:
                param.fill_(math.inf)


def test_the_result_check_takes_the_smallest_finite_error_where_the_for_loop_has_none() -> None:
    """A for-loop whose parameters overflow is itself wrong; the others are judged against the
    smallest finite error."""
    from fused_optim.bench_check import check_results
    from fused_sgd import FusedSGD

    hyper = {"lr": 0.01, "momentum": 0.9}
    base = shapes.make_params(shapes.SHAPE_SETS["resnet50"](), dtype=torch.float16, seed=3)
    grads = shapes.make_grads(base, seed=4)
    makers = {
        "fused": lambda params: FusedSGD(params, **hyper),
        "torch_forloop": lambda params: _Overflows(params, **hyper, foreach=False),
        "torch_foreach": lambda params: torch.optim.SGD(params, **hyper, foreach=True),
    }
    exact = lambda params: torch.optim.SGD(params, **hyper)  # noqa: E731
    check = check_results(list(makers), lambda key, params: makers[key](params), exact, base, grads)
    assert check["baseline"] == "smallest finite error"
    assert {key for key, entry in check["competitors"].items() if entry["wrong"]} == {"torch_forloop"}
    assert math.isfinite(check["baseline_mean_abs_error"]) and check["baseline_mean_abs_error"] > 0
