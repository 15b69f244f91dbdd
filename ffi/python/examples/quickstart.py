"""A Horovod script with its import changed: `kolorun -np 2 python quickstart.py`."""
import torch
import kolo.torch as hvd

hvd.init()
torch.manual_seed(hvd.rank())  # different data on every rank
model = torch.nn.Linear(10, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(opt, root_rank=0)
for step in range(100):
    x = torch.randn(32, 10)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
    opt.step()  # gradients were averaged over the ranks during backward
print(f"rank {hvd.rank()} of {hvd.size()}: weight sum {model.weight.sum().item():.6f}")
