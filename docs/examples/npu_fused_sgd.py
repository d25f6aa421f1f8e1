import torch

from fused_sgd import NpuFusedSGD  # torch_npu: from torch_npu.optim import NpuFusedSGD


def _create_simple_params_and_grads():
    params = [
        torch.arange(6).reshape(2, 3).float(),
        torch.arange(12).reshape(4, 3).float(),
        torch.arange(6).reshape(2, 3).half(),
        torch.arange(12).reshape(4, 3).half(),
        torch.arange(15).reshape(5, 3).float(),
        torch.arange(18).reshape(6, 3).half(),
        torch.arange(6).reshape(2, 3).float(),
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
print(params[0])
