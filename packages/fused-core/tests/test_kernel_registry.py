"""KernelRegistry: the documented resolution order, latest-wins within a level, predicates
called once per (device, dtype), and errors for nothing-matches and unknown devices."""

from __future__ import annotations

import itertools

import pytest
import torch

from fused_core import PluginError
from fused_core.kernels import KernelRegistry

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _launcher(label: str):
    def launch(params, grads, state, hyperparams, first_step) -> None:
        raise AssertionError("never launched here")

    launch.label = label  # type: ignore[attr-defined]
    return launch


# The four levels of kernels.py's docstring, best first, as (device type, dtype filter).
LEVELS = {
    "device+dtype": ("cpu", {F32, F16}),
    "device": ("cpu", None),
    "any+dtype": ("*", [F32]),
    "any": ("*", None),
}
# Entries that must never be chosen for (cpu, float32): another device, or a dtype filter that refuses.
DECOYS = [
    ("cuda", None),
    ("cuda", {F32}),
    ("cpu", {BF16}),
    ("cpu", lambda device, dtype: False),
    ("*", (F16,)),
    ("*", lambda device, dtype: dtype != F32),
]


@pytest.mark.parametrize(
    "order",
    [
        order
        for size in range(1, 5)
        for subset in itertools.combinations(LEVELS, size)
        for order in itertools.permutations(subset)
    ],
    ids="-then-".join,
)
def test_best_level_wins_whatever_the_registration_order(order: tuple[str, ...]) -> None:
    registry = KernelRegistry()
    for index, (device_type, dtypes) in enumerate(DECOYS):
        registry.register("k", device_type, _launcher(f"decoy{index}"), dtypes)
    for level in order:
        device_type, dtypes = LEVELS[level]
        registry.register("k", device_type, _launcher(level), dtypes)
        registry.register("other", device_type, _launcher(f"other kernel {level}"), dtypes)
    for index, (device_type, dtypes) in enumerate(DECOYS):  # decoys registered last too
        registry.register("k", device_type, _launcher(f"late decoy{index}"), dtypes)
    best = min(order, key=list(LEVELS).index)
    assert registry.resolve("k", CPU, F32).label == best
    assert registry.entry("k", CPU, F32).device_type == LEVELS[best][0]


def test_predicate_counts_as_a_dtype_match() -> None:
    registry = KernelRegistry()
    registry.register("k", "cpu", _launcher("device"))
    registry.register("k", "cpu", _launcher("predicate"), lambda device, dtype: dtype is F16)
    assert registry.resolve("k", CPU, F16).label == "predicate"
    assert registry.resolve("k", CPU, F32).label == "device"


def test_latest_registration_wins_within_a_level() -> None:
    registry = KernelRegistry()
    registry.register("k", "cpu", _launcher("first set"), {F32})
    registry.register("k", "cpu", _launcher("predicate"), lambda device, dtype: True)
    registry.register("k", "cpu", _launcher("second set"), [F32, BF16])
    registry.register("k", "*", _launcher("any 1"))
    registry.register("k", "*", _launcher("any 2"))
    assert registry.resolve("k", CPU, F32).label == "second set"
    assert registry.resolve("k", CPU, F16).label == "predicate"
    assert registry.resolve("k", CUDA, F32).label == "any 2"
    # A registration after a resolution is seen (the resolution cache does not hide it).
    registry.register("k", "cpu", _launcher("third set"), {F32})
    assert registry.resolve("k", CPU, F32).label == "third set"
    assert registry.resolve("k", CPU, F16).label == "predicate"


def test_predicate_called_at_most_once_per_device_and_dtype() -> None:
    calls: list[tuple[torch.device, torch.dtype]] = []

    def only_fp16(device: torch.device, dtype: torch.dtype) -> bool:
        calls.append((device, dtype))
        return dtype is F16

    registry = KernelRegistry()
    registry.register("k", "*", _launcher("fallback"))
    registry.register("k", "cpu", _launcher("checked"), only_fp16)
    registry.register("k", "cuda", _launcher("checked on cuda"), only_fp16)
    for _ in range(5):
        for dtype in (F32, F16, BF16):
            expected = "checked" if dtype is F16 else "fallback"
            assert registry.resolve("k", CPU, dtype).label == expected
        assert registry.resolve("k", CUDA, F16).label == "checked on cuda"
    assert sorted(calls, key=str) == sorted([(CPU, F32), (CPU, F16), (CPU, BF16), (CUDA, F16)], key=str)
    # Later registrations (which must be seen by later resolutions) do not re-run the predicate:
    # a plugin's probe may be expensive (running a candidate op on thousands of elements).
    registry.register("unrelated", "cpu", _launcher("unrelated"))
    registry.register("k", "*", _launcher("newer fallback"))
    assert registry.resolve("k", CPU, F32).label == "newer fallback"
    assert registry.resolve("k", CPU, F16).label == "checked"
    assert len(calls) == 4


def test_nothing_matches_is_a_lookup_error() -> None:
    registry = KernelRegistry()
    with pytest.raises(LookupError, match="'k'"):
        registry.resolve("k", CPU, F32)
    registry.register("k", "cuda", _launcher("cuda only"))
    registry.register("k", "cpu", _launcher("fp16 only"), {F16})
    registry.register("k", "*", _launcher("bf16 only"), lambda device, dtype: dtype is BF16)
    registry.register("other", "cpu", _launcher("another kernel"))
    with pytest.raises(LookupError, match="'k'"):
        registry.resolve("k", CPU, F32)
    assert registry.resolve("k", CPU, F16).label == "fp16 only"
    assert registry.resolve("k", CPU, BF16).label == "bf16 only"


@pytest.mark.parametrize("device_type", ["tpu", "CPU", "cuda:0", ""])
def test_unknown_device_type_is_a_plugin_error_naming_the_plugin(device_type: str) -> None:
    registry = KernelRegistry()
    with pytest.raises(PluginError) as info:
        registry.register("k", device_type, _launcher("nowhere"), plugin="some_plugin")
    assert "some_plugin" in str(info.value)
    assert f"'{device_type}'" in str(info.value)
    with pytest.raises(LookupError):
        registry.resolve("k", CPU, F32)


def test_launcher_must_be_callable() -> None:
    registry = KernelRegistry()
    with pytest.raises(PluginError, match="some_plugin"):
        registry.register("k", "cpu", "not a function", plugin="some_plugin")  # type: ignore[arg-type]
