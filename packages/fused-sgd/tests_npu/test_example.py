"""torch_npu's own NpuFusedSGD example, as its documentation prints it, with only the import changed
(``from torch_npu.optim import NpuFusedSGD`` -> ``from fused_sgd import NpuFusedSGD``); and the
training loop of docs/npu.md, with .npu() and torch_npu.npu.amp."""

from __future__ import annotations

import torch
from npu_suite import max_error

from fused_testing.reference import ReferenceSGD, relative_error


def test_torch_npu_example_unchanged_but_for_the_import(device) -> None:
    # ----- torch_npu's example, verbatim but for the third import -----
    import torch
    from torch_npu.npu.amp import GradScaler, autocast  # noqa: F401  (imported, unused, as in the example)

    from fused_sgd import NpuFusedSGD

    def _create_simple_params_and_grads():
        params = [
            torch.arange(6).reshape(2, 3).float().npu(),
            torch.arange(12).reshape(4, 3).float().npu(),
            torch.arange(6).reshape(2, 3).half().npu(),
            torch.arange(12).reshape(4, 3).half().npu(),
            torch.arange(15).reshape(5, 3).float().npu(),
            torch.arange(18).reshape(6, 3).half().npu(),
            torch.arange(6).reshape(2, 3).float().npu(),
        ]

        for i, p in enumerate(params):
            if i < len(params) - 1:
                p.requires_grad = True
                p.grad = p.clone().detach() / 100.0

        return params

    opt_kwargs = dict(lr=0.01, momentum=0.9, weight_decay=0.001)
    params = _create_simple_params_and_grads()
    fused_opt = NpuFusedSGD(params, **opt_kwargs)
    with torch.no_grad():
        fused_opt.step()
    # ----- end of the example -----

    expected = _create_simple_params_and_grads()
    reference = ReferenceSGD([p.detach().cpu() for p in expected], **opt_kwargs)
    reference.step([None if p.grad is None else p.grad.cpu() for p in expected])
    for i, (p, r) in enumerate(zip(params, reference.params)):
        assert p.device.type == "npu"
        assert relative_error(p.detach().cpu(), r) <= torch.finfo(p.dtype).eps, f"parameter {i} ({p.dtype})"
    assert len(fused_opt.state_dict()["state"]) == 6  # momentum for the six parameters with a gradient


def test_training_loop_of_the_docs(device) -> None:
    """docs/npu.md's loop: a model moved with .npu(), torch_npu.npu.amp's autocast and GradScaler."""
    import torch_npu

    from fused_sgd import NpuFusedSGD
    from fused_testing.parity import make_batches, make_model

    def train(optimizer_cls):
        model = make_model("convnet").npu()
        optimizer = optimizer_cls(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        scaler = torch_npu.npu.amp.GradScaler()
        for inputs, targets in make_batches("convnet", 10, seed=3):
            inputs, targets = inputs.npu(), targets.npu()
            optimizer.zero_grad()
            with torch_npu.npu.amp.autocast():
                loss = torch.nn.functional.cross_entropy(model(inputs).float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return model

    ours = train(NpuFusedSGD)
    theirs = train(lambda params, **hp: torch.optim.SGD(params, foreach=False, **hp))
    assert max_error(list(ours.parameters()), list(theirs.parameters())) <= 1e-3
