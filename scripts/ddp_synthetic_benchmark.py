#!/usr/bin/env python3
"""PyTorch DDP twin of examples/synthetic_benchmark.rs (after Horovod's
pytorch_synthetic_benchmark.py), for a side-by-side comparison: the same models, batch and
timing, printed in the same format.

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        scripts/ddp_synthetic_benchmark.py --model mlp --image-size 32

gloo on CPU, nccl with --device cuda. The resnets need torchvision (the release paired with
torch 2.11.0); the mlp needs only torch.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def build(args):
    if args.model == "mlp":
        inp = 3 * args.image_size * args.image_size
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(inp, args.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(args.hidden, args.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(args.hidden, args.num_classes),
        )
    import torchvision  # only the resnets need it

    return getattr(torchvision.models, args.model)(num_classes=args.num_classes)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50", "mlp"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--num-warmup-batches", type=int, default=10)
    p.add_argument("--num-batches-per-iter", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if cuda else "cpu")
    model = build(args).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    torch.manual_seed(rank)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)

    def batch():
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    params = sum(t.numel() for t in model.parameters())
    if rank == 0:
        print(f"model {args.model} ({params} parameters), batch {args.batch_size} of "
              f"{args.image_size}x{args.image_size} images, {size} rank(s), device "
              f"{args.device}, DDP")
    for _ in range(args.num_warmup_batches):
        batch()
    rates, step_ms = [], []
    for i in range(args.num_iters):
        t = time.perf_counter()
        for _ in range(args.num_batches_per_iter):
            batch()
        if cuda:
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t
        rates.append(args.batch_size * args.num_batches_per_iter / secs)
        step_ms.append(secs * 1e3 / args.num_batches_per_iter)
        if rank == 0:
            print(f"Iter #{i}: {rates[-1]:.1f} img/sec per rank")
    if rank == 0:
        mean, sd = statistics.mean(rates), statistics.pstdev(rates)
        print(f"Img/sec per rank: {mean:.1f} +-{1.96 * sd:.1f}")
        print(f"Total img/sec on {size} rank(s): {size * mean:.1f} +-{size * 1.96 * sd:.1f}")
        print(f"median step: {statistics.median(step_ms):.2f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
