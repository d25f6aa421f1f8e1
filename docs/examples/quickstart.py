import torch

from fused_sgd import FusedSGD

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
inputs, targets = torch.randn(256, 64), torch.randint(0, 10, (256,))
for _ in range(50):
    opt.zero_grad()  # as torch's: every .grad becomes None
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    opt.step()  # a few kernel launches, whatever the number of tensors
print(f"loss {loss.item():.3f}; 4 tensors in {len(opt.get_combined_params())} flat buffer")
