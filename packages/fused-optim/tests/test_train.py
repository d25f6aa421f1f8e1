"""``fused-optim train``, run through the command line on the real digits with short settings.

The quick model (2 x 32 MLP, 3 epochs = 135 steps of 32 images, the default lr 0.05) reaches
well over 50 % test accuracy, against 10 % for chance: the digits are nearly linearly separable.
Against torch.optim.SGD(foreach=False) the runs are bit for bit the same on the CPU in fp32;
against torch's fused kernel they agree to float32 rounding for far more than 135 steps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fused_core.kernels import TORCH_SQRT_ENV
from fused_optim.cli import main
from fused_optim.train_data import batches_per_epoch, epoch_batches, load_digits
from fused_optim.train_report import RunReport, TrainReport, format_summary

QUICK = ["train", "--width", "32", "--depth", "2", "--epochs", "3"]
STEPS = 3 * 45


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """``--threads`` (default 1) sets torch's thread count for the process; give the next module its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One quick run shared by the tests that only read its output."""
    path = tmp_path_factory.mktemp("train") / "run.json"
    stdout = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(stdout):
        assert main([*QUICK, "--json", str(path)]) == 0
    return stdout.getvalue(), json.loads(path.read_text())


def test_both_runs_learn_and_agree(quick_run: tuple[str, dict]) -> None:
    _, record = quick_run
    torch_run, fused_run = record["runs"]["torch"], record["runs"]["fused"]
    assert torch_run["test_accuracy"] > 0.5 and fused_run["test_accuracy"] > 0.5
    assert abs(torch_run["test_accuracy"] - fused_run["test_accuracy"]) <= 1 / record["data"]["test"]
    assert record["comparison"]["max_rel_param_diff"] <= 1e-5
    assert record["comparison"]["max_abs_param_diff"] <= 1e-5
    assert record["comparison"]["steps_agreeing_to_rounding"] == record["steps"]
    assert torch_run["losses"][-1] < torch_run["losses"][0]


def test_summary_table(quick_run: tuple[str, dict]) -> None:
    summary, record = quick_run
    for expected in (
        "torch.optim.SGD(foreach=False)",
        "FusedSGD",
        "test accuracy",
        "train loss (start -> end)",
        "optimizer.step() median",
        "FusedSGD's optimizer.step() is",
        "3/3",
    ):
        assert expected in summary
    assert f"{record['runs']['fused']['test_accuracy']:.2%}" in summary
    # The meaningful comparison leads the results; there is no drift to explain.
    results = " ".join(summary[summary.index("result:") :].split())
    assert results.startswith(
        f"result: FusedSGD is bit for bit torch.optim.SGD(foreach=False): the same loss at each of the {STEPS} steps"
    )
    assert results.index("result:") < results.index("speed:") < results.index("test accuracy")
    assert "drift:" not in summary and "DIVERGED" not in summary


def test_json_record(quick_run: tuple[str, dict]) -> None:
    _, record = quick_run
    assert set(record) == {
        "config",
        "data",
        "model",
        "steps",
        "steps_per_epoch",
        "runs",
        "epochs",
        "comparison",
        "diverged",
    }
    assert record["diverged"] is False
    assert record["config"] == {
        "width": 32,
        "depth": 2,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "reference": "for-loop",
        "epochs": 3,
        "batch_size": 32,
        "seed": 0,
        "dtype": "fp32",
        "device": "cpu",
        "threads": 1,
    }
    assert record["data"] == {"train": 1438, "test": 359, "features": 64, "classes": 10}
    assert record["model"] == {"tensors": 6, "parameters": 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10}
    assert record["steps_per_epoch"] == 45 and record["steps"] == STEPS
    assert [epoch["epoch"] for epoch in record["epochs"]] == [1, 2, 3]
    last = record["epochs"][-1]
    assert last["train_loss"]["fused"] == record["runs"]["fused"]["train_loss"]
    assert last["test_accuracy"]["torch"] == record["runs"]["torch"]["test_accuracy"]
    for run in record["runs"].values():
        assert run["diverged"] is None and run["train_loss"] < run["initial_train_loss"]
        assert len(run["losses"]) == len(run["step_seconds"]) == STEPS
        assert all(seconds > 0 for seconds in run["step_seconds"])
        assert run["step_seconds_first"] == run["step_seconds"][0]
        assert min(run["step_seconds"]) <= run["step_seconds_median"] <= max(run["step_seconds"])
    assert record["runs"]["fused"]["optimizer"] == "FusedSGD"
    comparison = record["comparison"]
    assert len(comparison["rel_param_diff_per_step"]) == STEPS
    assert max(comparison["rel_param_diff_per_step"]) <= 1e-5
    median_ratio = record["runs"]["torch"]["step_seconds_median"] / record["runs"]["fused"]["step_seconds_median"]
    assert comparison["step_speedup_median"] == pytest.approx(median_ratio)


def test_bit_for_bit_against_torchs_for_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On CPU fp32 FusedSGD performs torch.optim.SGD(foreach=False)'s operations in its order
    (docs/kernels.md), in torch's default loop: not one bit differs, over every step."""
    path = tmp_path / "run.json"
    assert main([*QUICK, "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["comparison"]["max_rel_param_diff"] == 0.0 and record["comparison"]["bit_identical"]
    assert record["runs"]["torch"]["losses"] == record["runs"]["fused"]["losses"]
    assert "FusedSGD is bit for bit torch.optim.SGD(foreach=False)" in capsys.readouterr().out


def test_against_torchs_fused_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch's fused kernel rounds differently (no fused multiply-adds): close, and said so."""
    path = tmp_path / "run.json"
    assert main([*QUICK, "--reference", "fused", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["comparison"]["max_rel_param_diff"] <= 1e-3
    out = capsys.readouterr().out
    assert "torch.optim.SGD(fused=True)" in out
    if not record["comparison"]["bit_identical"]:
        results = out[out.index("result:") :]
        assert results.startswith("result:    test accuracy")
        drift = results[results.index("drift:") : results.index("speed:")]
        assert drift.count("\n") == 1 and "torch.optim.SGD(fused=True) rounds differently" in drift


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert main([*QUICK, "--epochs", "1", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    assert f"wrote {path}" in capsys.readouterr().out


def test_plot_without_matplotlib_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([*QUICK, "--plot", str(tmp_path / "curves.png")]) == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and "fused-optim[plot]" in captured.err
    assert "-m pip install" in captured.err and "packages/fused-optim[plot]" in captured.err  # the local package
    assert captured.out == "" and "Traceback" not in captured.err


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_npu_without_torch_npu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, "--device", "npu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fused-optim train: error: --device npu needs torch_npu")
    assert "not installed" in captured.err and "Traceback" not in captured.err
    assert "torch_npu" not in sys.modules


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "tpu"], "expected cpu, cuda, cuda:N, npu or npu:N"),
        (["--device", "cuda:x"], "expected cpu, cuda, cuda:N, npu or npu:N"),
        (["--lr", "-0.1"], "invalid hyperparameter 'lr'"),
        (["--momentum", "0", "--nesterov"], "Nesterov momentum requires momentum > 0"),
        (["--json", "/nonexistent-dir/run.json"], "does not exist"),
    ],
)
def test_bad_options_are_one_line_errors(options: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*QUICK, *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bf16_runs_and_explains_why_it_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.json"
    assert main([*QUICK, "--dtype", "bf16", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["config"]["dtype"] == "bf16"
    assert record["runs"]["torch"]["test_accuracy"] > 0.5 and record["runs"]["fused"]["test_accuracy"] > 0.5
    assert record["comparison"]["steps_agreeing_to_rounding"] is None  # no fp32 threshold applies
    out = capsys.readouterr().out
    results = out[out.index("result:") :]
    assert results.startswith("result:    test accuracy")  # the meaningful comparison first
    drift = results[results.index("drift:") : results.index("speed:")]
    assert drift.count("\n") == 1  # one line, with its cause
    assert "steps: FusedSGD rounds a bf16 update once, torch after every operation" in drift


def _adamw(path: Path) -> tuple[str, dict]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*QUICK, "--optimizer", "adamw", "--json", str(path)]) == 0
    return stdout.getvalue(), json.loads(path.read_text())


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One quick run with --optimizer adamw (its defaults), shared by the tests that read its output."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv(TORCH_SQRT_ENV, raising=False)
        return _adamw(tmp_path_factory.mktemp("train-adamw") / "run.json")


def test_adamw_is_torchs_for_loop_to_rounding(adamw_run: tuple[str, dict]) -> None:
    """FusedAdamW against torch.optim.AdamW(foreach=False) with train's AdamW defaults: both learn,
    and on the CPU in fp32 they agree to float32 rounding at every step (FusedAdamW takes the
    correctly rounded square root, torch's CPU for-loop MKL's where torch has MKL)."""
    out, record = adamw_run
    assert record["config"]["optimizer"] == "adamw"
    hyperparameters = {key: record["config"].get(key) for key in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    assert hyperparameters == {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False}
    assert "momentum" not in record["config"] and "nesterov" not in record["config"]
    torch_run, fused_run = record["runs"]["torch"], record["runs"]["fused"]
    assert torch_run["optimizer"] == "torch.optim.AdamW(foreach=False)" and fused_run["optimizer"] == "FusedAdamW"
    assert torch_run["test_accuracy"] > 0.5 and fused_run["test_accuracy"] > 0.5
    assert fused_run["train_loss"] < fused_run["initial_train_loss"] and record["diverged"] is False
    assert record["comparison"]["steps_agreeing_to_rounding"] == record["steps"] == STEPS
    assert "training:  lr=0.003 betas=(0.9, 0.999) eps=1e-08 weight_decay=0.01 amsgrad=False," in out
    assert "compared:  FusedAdamW against torch.optim.AdamW(foreach=False)" in out
    assert "  epoch       torch  FusedAdamW       torch  FusedAdamW  difference" in out
    assert "FusedAdamW's optimizer.step() is" in out and "SGD" not in out


def test_adamw_with_torchs_square_root_is_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FUSED_OPTIM_TORCH_SQRT, not one bit differs from torch.optim.AdamW(foreach=False), over
    every step."""
    monkeypatch.setenv(TORCH_SQRT_ENV, "1")
    out, record = _adamw(tmp_path / "run.json")
    torch_run, fused_run = record["runs"]["torch"], record["runs"]["fused"]
    assert record["comparison"]["bit_identical"] and record["comparison"]["max_rel_param_diff"] == 0.0
    assert torch_run["losses"] == fused_run["losses"]
    results = " ".join(out[out.index("result:") :].split())
    assert results.startswith(
        "result: FusedAdamW is bit for bit torch.optim.AdamW(foreach=False): the same loss at each of the 135 steps"
    )


def test_adamw_takes_its_own_options(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    argv = [*QUICK, "--epochs", "1", "--optimizer", "adamw", "--lr", "0.01", "--betas", "0.8", "0.99"]
    assert main([*argv, "--eps", "1e-6", "--amsgrad", "--reference", "foreach", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    config = {key: record["config"][key] for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "reference")}
    expected = {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 1e-2, "amsgrad": True}
    assert config == {**expected, "reference": "foreach"}
    assert record["runs"]["torch"]["optimizer"] == "torch.optim.AdamW(foreach=True)"
    assert record["comparison"]["max_rel_param_diff"] <= 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--optimizer", "adamw", "--momentum", "0.9"], "--momentum: not an option of --optimizer adamw"),
        (["--optimizer", "adamw", "--nesterov"], "--nesterov: not an option of --optimizer adamw"),
        (["--betas", "0.9", "0.99", "--eps", "1e-6"], "--betas, --eps: not an option of --optimizer sgd"),
        (["--optimizer", "adamw", "--betas", "0.9", "1.5"], "beta"),
        (["--optimizer", "adamw", "--lr", "-1"], "lr"),
    ],
)
def test_options_of_the_other_optimizer_are_one_line_errors(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*QUICK, *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fused-optim train: error: ") and message in err and err.count("\n") == 1


def test_unknown_optimizer_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICK, "--optimizer", "no-such-optimizer"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --optimizer: invalid choice: 'no-such-optimizer'" in err and "'sgd'" in err and "'adamw'" in err


def test_adamw_without_fused_adam_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fused_adam", None)  # import fused_adam now fails
    assert main([*QUICK, "--optimizer", "adamw"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "FusedAdamW from the fused-adam package" in captured.err
    assert "pip install ./packages/fused-adam" in captured.err


def test_help_shows_the_deep_narrow_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "fused-optim train --depth 32 --width 32" in out
    assert "(default: 0.05" in out
    assert "cpu, cuda, cuda:N, npu or npu:N" in out


def test_digits_split_and_batches_are_reproducible() -> None:
    data = load_digits(seed=3)
    assert data.train_inputs.shape == (1438, 64) and data.test_inputs.shape == (359, 64)
    assert data.train_inputs.dtype == torch.float32 and 0 <= data.train_inputs.min() <= data.train_inputs.max() <= 1
    assert set(data.train_targets.tolist()) == set(range(10))
    assert torch.equal(load_digits(seed=3).test_targets, data.test_targets)
    assert not torch.equal(load_digits(seed=4).test_targets, data.test_targets)

    batches = list(epoch_batches(data, epochs=2, batch_size=100, seed=1))
    assert len(batches) == 2 * batches_per_epoch(data, 100) == 30
    assert [len(t) for _, t in batches[:15]] == [100] * 14 + [38]
    first_epoch = torch.cat([t for _, t in batches[:15]])
    assert torch.equal(first_epoch.sort().values, data.train_targets.sort().values)  # each image once
    assert not torch.equal(batches[0][1], batches[15][1])  # a new order every epoch
    again = list(epoch_batches(data, epochs=2, batch_size=100, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def _report(torch_losses: list[float], fused_losses: list[float], rel_diffs: list[float], **runs: float) -> TrainReport:
    run = RunReport(
        "torch.optim.SGD(foreach=False)", 0.9, runs.get("torch_end", 0.1), torch_losses, [2e-4, 1e-4, 1e-4, 3e-4]
    )
    run.initial_loss = 2.3
    fused = RunReport("FusedSGD", 0.8, runs.get("fused_end", 0.2), fused_losses, [5e-3, 5e-5, 5e-5, 5e-5])
    fused.initial_loss = 2.3
    config = {"width": 8, "depth": 1, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}
    config |= {"epochs": 2, "batch_size": 4, "seed": 0, "dtype": "fp32", "device": "cpu", "threads": 1}
    data = {"train": 8, "test": 4, "features": 64, "classes": 10}
    return TrainReport(config, data, {"tensors": 4, "parameters": 610}, 2, run, fused, 0.5, 0.2, rel_diffs)


def test_summary_explains_a_drift_in_one_line() -> None:
    report = _report([2.0, 1.5, 1.0, 0.5], [2.0, 1.5, 1.1, 0.7], [0, 1e-7, 2e-5, 0.2])
    summary = format_summary(report)
    assert summary.startswith(
        "result:    test accuracy 80.00% with FusedSGD, 90.00% with torch.optim.SGD(foreach=False)"
    )
    drift = summary[summary.index("drift:") : summary.index("speed:")]
    assert drift == (
        "drift:     parameters 2.0e-01 apart after 4 steps (2 within float32 rounding):"
        " torch.optim.SGD(foreach=False) rounds differently, training amplifies it\n"
    )
    assert "FusedSGD's optimizer.step() is 3.00x faster" in " ".join(summary.split())
    assert report.epoch_losses(report.fused) == [1.75, pytest.approx(0.9)]
    assert not report.diverged


@pytest.mark.parametrize(
    ("losses", "end", "why"),
    [
        ([2.0, 1.5, float("nan"), float("nan")], float("nan"), "its loss became nan at step 3"),
        ([2.0, 2.2, 2.4, 2.5], 2.4, "its final training loss 2.4000 is above its start, 2.3000"),
    ],
)
def test_a_diverged_run_is_reported(losses: list[float], end: float, why: str) -> None:
    report = _report(losses, losses, [0.0] * 4, torch_end=end, fused_end=end)
    assert [reason for _, reason in report.diverged] == [why, why]
    summary = " ".join(format_summary(report).split())
    assert "DIVERGED: torch.optim.SGD(foreach=False) and FusedSGD did not train" in summary
    assert why in summary and "lower --lr (now 0.1)" in summary
    assert "drift:" not in summary  # no distance between diverged runs
    assert report.as_json()["diverged"] is True


def test_divergence_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """A learning rate far past stability: the loss becomes NaN, and the run says so and fails."""
    assert main([*QUICK, "--epochs", "1", "--lr", "50"]) == 3
    captured = capsys.readouterr()
    assert "DIVERGED:" in captured.out
    assert "fused-optim train: error: training diverged" in captured.err


def test_epochs_are_printed_as_they_end_through_a_pipe() -> None:
    """stdout is a pipe, not a terminal: the header and each epoch arrive before the run ends."""
    argv = [sys.executable, "-c", "from fused_optim.cli import main; raise SystemExit(main())"]
    argv += [*QUICK, "--epochs", "40"]
    env = {**os.environ, "PYTHONUNBUFFERED": ""}
    env.pop("PYTHONUNBUFFERED")
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as process:
        assert process.stdout is not None
        start = time.monotonic()
        seen = []
        for line in process.stdout:
            seen.append((time.monotonic() - start, line))
            if line.lstrip().startswith("2/40"):
                break
        assert process.poll() is None, "the second epoch's line came only when the run ended"
        rest = process.stdout.read()
        assert process.wait() == 0
    assert seen[0][1].startswith("data:")
    assert "40/40" in rest and "result:" in rest


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """Docstrings become --help text without their reST markup."""
    for argv in (["--help"], ["train", "--help"], ["bench", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and ":mod:" not in out and ":func:" not in out, argv
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fused-optim: one console script" in capsys.readouterr().out


def test_set_passes_any_hyperparameter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--set amsgrad=True --set betas=(0.8, 0.99)`` reach both optimizers (the JSON records them)."""
    report = tmp_path / "run.json"
    assert (
        main(
            [
                *QUICK,
                "--optimizer",
                "adamw",
                "--set",
                "amsgrad=True",
                "--set",
                "betas=(0.8, 0.99)",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    config = json.loads(report.read_text())["config"]
    assert config["amsgrad"] is True and tuple(config["betas"]) == (0.8, 0.99)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--set", "lr"], "expected KEY=VALUE"),
        (["--set", "lr=fast"], "is not a Python literal"),
        (["--set", "lr=0.1", "--lr", "0.2"], "given twice"),
    ],
)
def test_bad_set_is_a_one_line_error(options: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.suppress(SystemExit):
        assert main([*QUICK, *options]) == 2
    assert message in capsys.readouterr().err


def test_a_reference_the_compared_class_lacks_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    from fused_optim import optimizers

    monkeypatch.setitem(optimizers.SPECS, "sgd", dataclasses.replace(optimizers.SPECS["sgd"], flags=("foreach",)))
    assert main([*QUICK, "--reference", "fused"]) == 2
    assert "torch.optim.SGD has no fused implementation" in capsys.readouterr().err
