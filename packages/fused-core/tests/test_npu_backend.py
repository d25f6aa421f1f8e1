"""fused-core's NPU backend, run against the torch_npu stand-in of ``fused_testing.npu_standin``.

No NPU exists here, so the ``npu`` fixture imports ``fused_core.backends.npu`` under the
stand-in and lets an ``NpuBackend`` (512-byte alignment) serve CPU tensors: storage-size
slots, format casts and ``npu_change_data_ptr`` bindings then run as they would on an
NPU, with the stand-in's CPU emulation of those APIs (its docstring says how far that
goes; notably, element order inside padded formats is not reproduced, so the tests check
formats explicitly).
Optimizer: the Signum test plugin (conftest), against its per-tensor reference.
The suite that runs on real hardware is ``packages/fused-sgd/tests_npu`` (``nox -s npu``).
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_core import InvalidParameterError, backends
from fused_testing import relative_error
from fused_testing.npu_standin import dangling, fresh_npu_import, installed_standin, torch_npu_blocked

RTOL = 1e-6
ND, NC1HWC0, FRACTAL_Z, FRACTAL_NZ = 2, 3, 4, 29


@dataclass
class Npu:
    torch_npu: Any

    def cast(self, param: torch.Tensor, fmt: int) -> torch.Tensor:
        """Put ``param`` in format ``fmt`` the way torch_npu's module casts do (``p.data = cast``)."""
        param.data = self.torch_npu.npu_format_cast(param.data, fmt)
        return param

    def fmt(self, tensor: torch.Tensor) -> int:
        return self.torch_npu.get_npu_format(tensor)


@pytest.fixture
def npu():
    with installed_standin() as torch_npu, pytest.MonkeyPatch.context() as patch:
        module = importlib.import_module("fused_core.backends.npu")
        patch.setitem(backends._loaded, "cpu", module.NpuBackend("cpu", alignment_bytes=512))
        yield Npu(torch_npu)


def convnet(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 20, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(20, 10),
        )


# torch_npu keeps conv weights in FRACTAL_Z, batch-norm parameters in NC1HWC0 and (where allowed)
# linear weights in FRACTAL_NZ; the first conv weight here is in NC1HWC0, so both padded conv formats run.
FORMATS = {"0.weight": NC1HWC0, "1.weight": NC1HWC0, "3.weight": FRACTAL_Z, "7.weight": FRACTAL_NZ}


def formatted_convnet(npu: Npu, seed: int = 0) -> nn.Sequential:
    model = convnet(seed)
    for name, param in model.named_parameters():
        if name in FORMATS:
            npu.cast(param, FORMATS[name])
    return model


def batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 10, (4,), generator=generator))
        for _ in range(steps)
    ]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, set_to_none: bool = False) -> None:
    optimizer.zero_grad(set_to_none=set_to_none)
    inputs, targets = batch
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def assert_models_match(model: nn.Module, reference: nn.Module, where: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p, q) <= RTOL, f"{where}: {name}"


def slots(optimizer: torch.optim.Optimizer) -> list[tuple[Any, Any]]:
    """(bucket, slot) for every parameter of the optimizer's current layout."""
    return [(bucket, slot) for bucket in optimizer._layout.buckets for slot in bucket.plan.slots]


# ----- layout: slot sizes, alignment, bindings -------------------------------------------------


def test_slots_are_sized_by_storage_size_and_aligned_to_512_bytes(npu, signum, generator) -> None:
    params = [
        nn.Parameter(torch.randn(10, 7, generator=generator)),  # ND: 70 elements
        npu.cast(nn.Parameter(torch.randn(8, 3, 3, 3, generator=generator)), NC1HWC0),  # 216 -> 8*1*3*3*16
        nn.Parameter(torch.randn(5, generator=generator)),  # ND
        npu.cast(nn.Parameter(torch.randn(20, 17, generator=generator)), FRACTAL_NZ),  # 340 -> 2*2*16*16
        npu.cast(nn.Parameter(torch.randn(4, 3, 3, 3, generator=generator).half()), FRACTAL_Z),  # 1*3*3*1*16*16
    ]
    sizes = [npu.torch_npu.get_storage_size(p) for p in params]
    assert sizes == [70, 1152, 5, 1024, 2304]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    optimizer = signum.Signum(params, lr=0.01)
    optimizer.step()
    optimizer.get_combined_grads()  # binds the gradients to the flat gradient buffer

    fp32, fp16 = optimizer._layout.buckets
    # 512 bytes = 128 fp32 / 256 fp16 elements
    assert [slot.offset for slot in fp32.plan.slots] == [0, 128, 1280, 1408]
    assert [slot.numel for slot in fp32.plan.slots] == [70, 1152, 5, 1024]
    assert fp32.plan.numel == 2432 and fp32.params.numel() == 2432
    assert [(slot.offset, slot.numel) for slot in fp16.plan.slots] == [(0, 2304)]
    for bucket, slot in slots(optimizer):
        byte_offset = slot.param.data_ptr() - bucket.params.data_ptr()
        assert byte_offset == slot.offset * slot.param.element_size()
        assert byte_offset % 512 == 0
        assert (slot.param.grad.data_ptr() - bucket.grads.data_ptr()) == byte_offset


def test_private_format_parameter_keeps_its_format_and_values_when_bound(npu, signum, generator) -> None:
    bias = nn.Parameter(torch.randn(16, generator=generator))
    weight = npu.cast(nn.Parameter(torch.randn(6, 5, 3, 3, generator=generator)), NC1HWC0)
    before = weight.detach().clone()
    size = npu.torch_npu.get_storage_size(weight)
    for p in (bias, weight):
        p.grad = torch.zeros_like(p)
    optimizer = signum.Signum([bias, weight], lr=0.0)  # binds, and leaves the values where they are
    optimizer.step()
    optimizer.get_combined_grads()  # binds the gradients too

    (bucket, _), (_, slot) = slots(optimizer)
    assert npu.fmt(weight) == NC1HWC0 and npu.torch_npu.get_storage_size(weight) == size == slot.numel
    assert torch.equal(weight, before), "values survive the move into the flat buffer"
    assert weight.data_ptr() == bucket.params.data_ptr() + slot.offset * 4
    # npu_change_data_ptr does not share the flat storage: the backend watches this parameter itself
    assert weight.untyped_storage()._cdata != bucket.params.untyped_storage()._cdata
    assert slot in optimizer._layout._unshared
    assert npu.fmt(weight.grad) == NC1HWC0
    assert npu.fmt(optimizer.state[weight]["momentum"]) == NC1HWC0
    # the parameter's elements (logical order in the stand-in) are the slot's; the padding is zero
    region = bucket.params[slot.offset : slot.end]
    assert torch.equal(region[: weight.numel()], before.flatten())
    assert not region[weight.numel() :].any()


def test_nd_gradient_is_cast_to_the_parameter_format_when_read_and_bound(npu, signum, generator, monkeypatch) -> None:
    weight = npu.cast(nn.Parameter(torch.randn(4, 6, 3, 3, generator=generator)), NC1HWC0)
    casts: list[tuple[int, int]] = []
    real_cast = npu.torch_npu.npu_format_cast

    def spy(tensor: torch.Tensor, fmt: int) -> torch.Tensor:
        casts.append((npu.fmt(tensor), fmt))
        return real_cast(tensor, fmt)

    monkeypatch.setattr(npu.torch_npu, "npu_format_cast", spy)
    optimizer = signum.Signum([weight], lr=0.01)
    for step in range(2):  # at the first build, then when a new ND gradient replaces the bound one
        grad = torch.randn(weight.shape, generator=generator)
        weight.grad = grad.clone()
        assert npu.fmt(weight.grad) == ND
        casts.clear()
        optimizer.step()
        assert (ND, NC1HWC0) in casts, f"step {step}: the ND gradient was not cast to NC1HWC0"
        assert npu.fmt(weight.grad) == ND, f"step {step}: the step reads the gradient, it does not replace it"
        optimizer.get_combined_grads()  # binds it: cast to the parameter's format, in its slot
        assert npu.fmt(weight.grad) == NC1HWC0, f"step {step}"
        assert torch.equal(weight.grad, grad), f"step {step}"
        ((bucket, slot),) = slots(optimizer)
        assert weight.grad.data_ptr() == bucket.grads.data_ptr() + slot.offset * 4
        assert torch.equal(bucket.grads[slot.offset : slot.offset + weight.numel()], grad.flatten())


# ----- training against the per-tensor reference ------------------------------------------------


def test_training_with_nd_and_private_formats_matches_the_per_tensor_reference(npu, signum) -> None:
    model, reference = formatted_convnet(npu), convnet()
    assert {name: npu.fmt(p) for name, p in model.named_parameters() if npu.fmt(p) != ND} == FORMATS
    optimizer = signum.Signum(model.parameters(), lr=0.01, beta=0.9)
    reference_optimizer = signum.Reference(reference.parameters(), lr=0.01, beta=0.9)
    for step, batch in enumerate(batches(12)):
        set_to_none = step % 4 == 3  # fresh ND gradients from autograd now and then
        train_step(model, optimizer, batch, set_to_none)
        train_step(reference, reference_optimizer, batch, set_to_none)
        assert_models_match(model, reference, f"step {step}")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert npu.fmt(p) == FORMATS.get(name, ND), name
        momentum, expected = optimizer.state[p]["momentum"], reference_optimizer.state[q]["momentum"]
        assert npu.fmt(momentum) == npu.fmt(p) and relative_error(momentum, expected) <= RTOL, name


def test_reassigned_private_parameter_is_caught_by_its_sentinel_and_updated(npu, signum) -> None:
    """``p.data = t`` on a parameter bound with npu_change_data_ptr moves no storage use count;
    only the backend's per-step sentinel on that parameter's data pointer sees it."""
    model, reference = formatted_convnet(npu), convnet()
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference_optimizer = signum.Reference(reference.parameters(), lr=0.01)
    data = batches(8)
    for batch in data[:3]:
        train_step(model, optimizer, batch)
        train_step(reference, reference_optimizer, batch)

    conv = model[3].weight  # FRACTAL_Z, in the middle of the run
    new = torch.randn(conv.shape, generator=torch.Generator().manual_seed(7))
    conv.data = npu.torch_npu.npu_format_cast(new.clone(), FRACTAL_Z)
    reference[3].weight.data = new.clone()
    layout = optimizer._layout
    assert all(torch._C._storage_Use_Count(cdata) == count for cdata, count in layout._watched), (
        "the re-assignment moved a use count, so this test would not exercise the sentinel"
    )
    assert not layout.is_current()

    for step, batch in enumerate(data[3:]):
        train_step(model, optimizer, batch)
        train_step(reference, reference_optimizer, batch)
        assert_models_match(model, reference, f"step {step} after p.data = t")
    bucket, slot = next((b, s) for b, s in slots(optimizer) if s.param is conv)
    assert conv.data_ptr() == bucket.params.data_ptr() + slot.offset * 4, "back in its slot"
    assert npu.fmt(conv) == FRACTAL_Z


def test_state_dict_round_trip_with_private_formats(npu, signum) -> None:
    model, reference = formatted_convnet(npu), convnet()
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference_optimizer = signum.Reference(reference.parameters(), lr=0.01)
    data = batches(6)
    for batch in data[:3]:
        train_step(model, optimizer, batch)
        train_step(reference, reference_optimizer, batch)

    resumed = formatted_convnet(npu, seed=5)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), model.parameters()):
            p.copy_(q)
    resumed_optimizer = signum.Signum(resumed.parameters(), lr=0.01)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for batch in data[3:]:
        train_step(resumed, resumed_optimizer, batch)
        train_step(reference, reference_optimizer, batch)
    assert_models_match(resumed, reference, "after load_state_dict")
    for name, p in resumed.named_parameters():
        assert npu.fmt(resumed_optimizer.state[p]["momentum"]) == npu.fmt(p), name


def test_grad_scaler_overflow_leaves_private_format_parameters_and_state_untouched(npu, signum) -> None:
    """torch_npu.npu.amp.GradScaler (the stand-in's, torch.amp.GradScaler("cpu") underneath)."""
    runs = {}
    for kind in ("fused", "reference"):
        model = formatted_convnet(npu) if kind == "fused" else convnet()
        optimizer = (signum.Signum if kind == "fused" else signum.Reference)(model.parameters(), lr=0.01)
        scaler = npu.torch_npu.npu.amp.GradScaler(init_scale=2.0**8, growth_interval=2)
        skipped = []
        for step, (inputs, targets) in enumerate(batches(8)):
            optimizer.zero_grad()
            scaler.scale(F.cross_entropy(model(inputs), targets)).backward()
            if step in (2, 5):
                model[3].weight.grad.view(-1)[3] = float("inf")
            before = [t.detach().clone() for t in model.parameters()]
            before += [optimizer.state[p]["momentum"].clone() for p in model.parameters() if p in optimizer.state]
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:
                skipped.append(step)
                after = [t.detach() for t in model.parameters()]
                after += [optimizer.state[p]["momentum"] for p in model.parameters() if p in optimizer.state]
                assert all(torch.equal(a, b) for a, b in zip(after, before)), f"{kind}: step {step} changed something"
        runs[kind] = (model, skipped)
    assert runs["fused"][1] == runs["reference"][1] == [2, 5]
    assert_models_match(runs["fused"][0], runs["reference"][0], "after the scaled run")


# ----- torch_npu absent, or failing to load -------------------------------------------------------

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import fused_core
for info in pkgutil.walk_packages(fused_core.__path__, "fused_core."):
    if info.name != "fused_core.backends.npu":
        importlib.import_module(info.name)
print("torch_npu" in sys.modules)
"""


def _run_python(script: str, pythonpath: Path) -> subprocess.CompletedProcess:
    paths = [str(pythonpath), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=120
    )


def test_importing_fused_core_does_not_import_torch_npu(tmp_path: Path) -> None:
    """In a fresh interpreter where importing torch_npu would raise, every fused_core module but the
    npu backend imports; the control shows that the tripwire torch_npu is the one Python finds."""
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text('raise AssertionError("tripwire: torch_npu was imported")\n')
    completed = _run_python(IMPORT_EVERYTHING, tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "False"
    control = _run_python("import fused_core.backends.npu", tmp_path)
    assert control.returncode != 0 and "tripwire: torch_npu was imported" in control.stderr


class Tripwire(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] == "torch_npu":
            raise AssertionError(f"{name} was imported")
        return None


def _train_on_cpu(signum, steps: int = 10) -> None:
    model, reference = convnet(), convnet()
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    reference_optimizer = signum.Reference(reference.parameters(), lr=0.01)
    for batch in batches(steps):
        train_step(model, optimizer, batch)
        train_step(reference, reference_optimizer, batch)
    assert_models_match(model, reference, f"CPU training, {steps} steps")


def test_cpu_training_never_imports_torch_npu(signum, monkeypatch) -> None:
    with fresh_npu_import():
        monkeypatch.setattr(sys, "meta_path", [Tripwire(), *sys.meta_path])
        _train_on_cpu(signum)
        assert "torch_npu" not in sys.modules


def test_without_torch_npu_the_npu_backend_is_an_error_naming_it(signum) -> None:
    with torch_npu_blocked():
        with pytest.raises(InvalidParameterError, match="device type 'npu' needs torch_npu"):
            importlib.import_module("fused_core.backends.npu")
        _train_on_cpu(signum)


def test_torch_npu_that_fails_to_load_is_an_error_naming_why(signum, tmp_path: Path, monkeypatch) -> None:
    """torch_npu installed without Ascend's CANN libraries fails in its own import."""
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text('raise OSError("libascendcl.so: cannot open shared object file")\n')
    with fresh_npu_import():
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(InvalidParameterError, match="torch_npu.*libascendcl.so"):
            importlib.import_module("fused_core.backends.npu")
        _train_on_cpu(signum)


# ----- regressions: defects the stand-in exposed in fused_core/backends --------------------------


def test_asking_for_the_npu_backend_without_torch_npu_names_torch_npu() -> None:
    with torch_npu_blocked():
        with pytest.raises(InvalidParameterError, match="needs torch_npu"):
            backends.get_backend("npu")
    with installed_standin():
        backend = backends.get_backend("npu")
        assert backend.device_type == "npu" and backend.alignment_bytes == 512


def test_rebuilt_layout_sizes_bound_nd_parameters_by_numel(npu, signum, generator) -> None:
    params = [
        nn.Parameter(torch.randn(64, 32, generator=generator)),
        nn.Parameter(torch.randn(32, generator=generator)),
    ]
    extra = nn.Parameter(torch.randn(16, generator=generator))
    optimizer = signum.Signum(params, lr=0.01)
    for p in (*params, extra):
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()
    optimizer.add_param_group({"params": [extra]})  # unfreezing a layer mid-training rebuilds the layout
    optimizer.step()
    assert [slot.numel for _, slot in slots(optimizer)] == [2048, 32, 16]


def _assert_bound_consistently(npu: Npu, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter's storage fits its slot, and its gradient (once bound) and state have its format."""
    optimizer.get_combined_grads()  # a step reads gradients where they lie; binding casts them into their slots
    for _, slot in slots(optimizer):
        p = slot.param
        assert npu.torch_npu.get_storage_size(p) <= slot.numel or npu.fmt(p) == ND, "storage overruns its slot"
        assert npu.fmt(p.grad) == npu.fmt(p), "gradient bound in another format than its parameter"
        for value in optimizer.state[p].values():
            assert npu.fmt(value) == npu.fmt(p), "state bound in another format than its parameter"


@pytest.mark.parametrize("change", ["nd-to-private", "private-to-nd"])
def test_reassignment_that_changes_the_format_rebinds_in_the_new_format(npu, signum, change: str) -> None:
    model = formatted_convnet(npu) if change == "private-to-nd" else convnet()
    optimizer = signum.Signum(model.parameters(), lr=0.01)
    data = batches(4)
    for batch in data[:2]:
        train_step(model, optimizer, batch)
    conv = model[3].weight
    values = conv.detach().clone()
    conv.data = npu.torch_npu.npu_format_cast(values, FRACTAL_Z) if change == "nd-to-private" else values
    for batch in data[2:]:
        train_step(model, optimizer, batch)
        _assert_bound_consistently(npu, optimizer)


def test_private_format_bindings_keep_their_flat_buffer_alive(npu, signum, generator) -> None:
    # a bucket of private-format parameters only: no ND parameter shares (and so keeps) its storage
    params = [npu.cast(nn.Parameter(torch.randn(4, 3, 3, 3, generator=generator)), fmt) for fmt in (3, 4)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer = signum.Signum(params, lr=0.01)
    optimizer.step()
    del optimizer
    gc.collect()
    for p in params:
        assert not dangling(p), "parameter"
        assert not dangling(p.grad), "gradient"
