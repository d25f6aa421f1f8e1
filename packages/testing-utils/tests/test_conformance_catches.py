"""The conformance suite can fail: deliberately wrong optimizers fail exactly the tests they should.

Each wrong optimizer is ``torch.optim.SGD`` with one defect, checked against the real
``torch.optim.SGD(foreach=False)``. The suite runs on them through pytest itself (the
``pytester`` plugin, in process), as a plugin author's test module would, and every test's
outcome is compared with the expectation: the correct optimizer passes everything, and each
defect fails the tests that exercise it and no others.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

from fused_testing.conformance import LIGHT_PARAMS, SEED_ENV, OptimizerConformance

MUTANTS = textwrap.dedent(
    '''
    import functools

    import torch

    from fused_testing.conformance import LIGHT_PARAMS, OptimizerConformance

    SGD = torch.optim.SGD
    REFERENCE = functools.partial(SGD, foreach=False)


    class SkipsWeightDecay(SGD):
        def step(self, closure=None):
            saved = [group["weight_decay"] for group in self.param_groups]
            for group in self.param_groups:
                group["weight_decay"] = 0.0
            try:
                return super().step(closure)
            finally:
                for group, weight_decay in zip(self.param_groups, saved):
                    group["weight_decay"] = weight_decay


    class ForgetsLoadedState(SGD):
        def load_state_dict(self, state_dict):
            super().load_state_dict({**state_dict, "state": {}})


    class ZeroGradAlwaysNone(SGD):
        def zero_grad(self, set_to_none=True):
            super().zero_grad(set_to_none=True)


    class AcceptsNegativeLR(SGD):
        def __init__(self, params, lr=1e-3, **kwargs):
            super().__init__(params, lr=abs(lr), **kwargs)


    class LosesStateWhenCopied(SGD):
        def __getstate__(self):
            return {**super().__getstate__(), "state": {}}


    class IgnoresScheduledLR(SGD):
        def step(self, closure=None):
            if not hasattr(self, "first_lr"):
                self.first_lr = [group.get("initial_lr", group["lr"]) for group in self.param_groups]
            current = [group["lr"] for group in self.param_groups]
            for group, lr in zip(self.param_groups, self.first_lr):
                group["lr"] = lr
            try:
                return super().step(closure)
            finally:
                for group, lr in zip(self.param_groups, current):
                    group["lr"] = lr


    class CoarseHalf(SGD):
        """fp16 results rounded through bf16 (3 fewer mantissa bits): right in fp32, worse in fp16."""

        def step(self, closure=None):
            loss = super().step(closure)
            with torch.no_grad():
                for group in self.param_groups:
                    for param in group["params"]:
                        if param.dtype == torch.float16:
                            param.copy_(param.to(torch.bfloat16))
            return loss


    class StaleAfterReallocation(SGD):
        """Updates the storage each parameter had at the first step, as a fused optimizer that
        missed a re-allocation would."""

        def step(self, closure=None):
            params = [param for group in self.param_groups for param in group["params"]]
            if not hasattr(self, "first_storage"):
                self.first_storage = [param.detach() for param in params]
            current = [param.data for param in params]
            for param, stale in zip(params, self.first_storage):
                param.data = stale
            try:
                return super().step(closure)
            finally:
                for param, data in zip(params, current):
                    param.data = data


    class Suite(OptimizerConformance):
        reference_cls = REFERENCE
        configs = {"plain": dict(lr=0.1), "momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=0.1)}
        state_keys = ("momentum_buffer",)
        exact_dtypes = (torch.float32, torch.float64)
        bad_hyperparameters = [(dict(lr=-1.0), ValueError)]
        param_specs = LIGHT_PARAMS
        steps = 4


    class TestCorrect(Suite):
        optimizer_cls = REFERENCE


    def _make(name, cls):
        return type(f"Test{name}", (Suite,), {"optimizer_cls": functools.partial(cls, foreach=False)})


    for _cls in (
        SkipsWeightDecay, ForgetsLoadedState, ZeroGradAlwaysNone, AcceptsNegativeLR, LosesStateWhenCopied,
        IgnoresScheduledLR, CoarseHalf, StaleAfterReallocation,
    ):
        globals()[f"Test{_cls.__name__}"] = _make(_cls.__name__, _cls)


    class TestDeclared(Suite):
        """A known defect declared as strict xfails, one of them wrongly."""

        optimizer_cls = functools.partial(SkipsWeightDecay, foreach=False)
        expected_failures = {
            "test_parity[momentum_wd-float32]": "skips weight decay",
            "test_parity[plain-float32]": "wrongly declared: passes, so the strict xfail fails",
            "test_zero_grad_default": "wrongly declared: passes (every config)",
        }
    '''
)

# The tests each defect must fail (by name and parametrisation id); all others must pass.
EXPECTED_FAILURES: dict[str, Callable[[str], bool]] = {
    "TestCorrect": lambda test: False,
    "TestSkipsWeightDecay": lambda test: "momentum_wd" in test,
    "TestForgetsLoadedState": lambda test: (
        test in ("test_state_dict_from_reference[momentum_wd]", "test_checkpoint_resume[momentum_wd]")
    ),
    "TestZeroGradAlwaysNone": lambda test: test.startswith("test_zero_grad[") and "set_to_none" not in test,
    "TestAcceptsNegativeLR": lambda test: test.startswith("test_bad_hyperparameters"),
    "TestLosesStateWhenCopied": lambda test: test.startswith("test_copy[momentum_wd"),
    "TestIgnoresScheduledLR": lambda test: test.startswith("test_lr_scheduler"),
    "TestCoarseHalf": lambda test: (
        test.startswith("test_low_precision") and test.endswith("float16]") and "bfloat16" not in test
    ),
    "TestStaleAfterReallocation": lambda test: test.startswith(("test_reallocation", "test_dtype_change")),
}


class _Reports:
    """A pytest plugin that keeps every test report."""

    def __init__(self) -> None:
        self.reports: list[pytest.TestReport] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(report)


@pytest.fixture(scope="module")
def mutant_run(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[str, str]]:
    """The suite over every wrong optimizer, run once through ``pytest.main`` (in process: torch is
    imported once): ``(class, test id) -> (outcome, failure text)``, the outcome of the call phase
    or of the phase that did not pass."""
    folder = tmp_path_factory.mktemp("mutants")
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_mutants.py").write_text(MUTANTS)
    plugin = _Reports()
    args = [str(folder), "-q", "-p", "no:cacheprovider", "--import-mode=importlib", "--rootdir", str(folder)]
    pytest.main(args, plugins=[plugin])
    outcomes: dict[tuple[str, str], tuple[str, str]] = {}
    for report in plugin.reports:
        _, cls, test = report.nodeid.split("::")
        if report.when == "call" or not report.passed:
            outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
            outcomes[cls, test] = (outcome, report.longreprtext)
    return outcomes


def test_each_defect_fails_exactly_its_tests(mutant_run: dict[tuple[str, str], tuple[str, str]]) -> None:
    outcomes = {key: outcome for key, (outcome, _) in mutant_run.items() if key[0] != "TestDeclared"}
    classes = {cls for cls, _ in outcomes}
    assert classes == set(EXPECTED_FAILURES), classes
    per_class = {cls: sum(1 for c, _ in outcomes if c == cls) for cls in classes}
    assert len(set(per_class.values())) == 1 and per_class["TestCorrect"] > 30, per_class
    wrong = []
    for (cls, test), outcome in sorted(outcomes.items()):
        expected = "failed" if EXPECTED_FAILURES[cls](test) else "passed"
        if outcome != expected:
            wrong.append(f"{cls}::{test}: {outcome}, expected {expected}")
    assert not wrong, "\n".join(wrong)
    for cls in EXPECTED_FAILURES:
        if cls != "TestCorrect":
            assert any(outcome == "failed" for (c, _), outcome in outcomes.items() if c == cls), cls


def test_failure_messages_name_the_seed(mutant_run: dict[tuple[str, str], tuple[str, str]]) -> None:
    outcome, text = mutant_run["TestSkipsWeightDecay", "test_parity[momentum_wd-float32]"]
    assert outcome == "failed"
    assert re.search(rf"parameter '\w+'.*bit for bit.*seed=(\d+): rerun with {SEED_ENV}=\1\]", text), text


def test_declared_failures_are_strict_xfails(mutant_run: dict[tuple[str, str], tuple[str, str]]) -> None:
    def outcome(test: str) -> str:
        return mutant_run["TestDeclared", test][0]

    assert outcome("test_parity[momentum_wd-float32]") == "xfailed"
    assert outcome("test_parity[plain-float32]") == "failed"  # XPASS(strict)
    assert outcome("test_zero_grad_default[plain]") == "failed"  # XPASS(strict): declared by name
    assert outcome("test_zero_grad_default[momentum_wd]") == "xfailed"  # fails: the defect
    assert outcome("test_parity[momentum_wd-float64]") == "failed"  # not declared
    assert outcome("test_parity[plain-float64]") == "passed"


def test_methods_can_be_called_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pytest's collection: a config dict and a dtype; a fixed seed reproduces the data."""

    class Wrong(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            for group in self.param_groups:
                group["lr"] = 0.05
            return super().step(closure)

    class Suite(OptimizerConformance):
        optimizer_cls = Wrong
        reference_cls = torch.optim.SGD
        configs = [dict(lr=0.1)]
        param_specs = LIGHT_PARAMS

    suite = Suite()
    monkeypatch.setenv(SEED_ENV, "1234")
    with pytest.raises(AssertionError, match=rf"seed=1234: rerun with {SEED_ENV}=1234") as first:
        suite.test_parity(dict(lr=0.1), torch.float32)
    with pytest.raises(AssertionError) as second:
        suite.test_parity(dict(lr=0.1), torch.float32)
    assert str(first.value) == str(second.value)


def test_importing_the_suite_does_not_import_pytest() -> None:
    code = "import sys, fused_testing.conformance; assert 'pytest' not in sys.modules, 'pytest imported'"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_misconfigured_suites_are_rejected() -> None:
    class NoReference(OptimizerConformance):
        optimizer_cls = torch.optim.SGD
        configs = [dict(lr=0.1)]

    class Typo(NoReference):
        reference_cls = torch.optim.SGD
        expected_failures = {"test_parity[plain-float32]": "no config is named plain", "test_zero_grad": "known"}

    with pytest.raises(TypeError, match="must set reference_cls"):
        NoReference.validate()
    with pytest.raises(TypeError, match=r"names no test: test_parity\[plain-float32\]$"):
        Typo.validate()
    assert "test_parity[lr=0.1-float32]" in Typo.conformance_ids()

    class NoBadCases(NoReference):
        reference_cls = torch.optim.SGD

    with pytest.raises(TypeError, match="NoBadCases.bad_hyperparameters is empty"):
        NoBadCases.validate()
