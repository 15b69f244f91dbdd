"""Synthetic training throughput with kolo.torch, after Horovod's benchmark of the same
name: random images (or vectors), a model, DistributedOptimizer; prints img/s per rank
and in total. --ddp runs the same loop on PyTorch DDP (gloo) for comparison.

    kolorun -np 2 python ffi/python/examples/pytorch_synthetic_benchmark.py --model mlp
    kolorun -np 2 python ffi/python/examples/pytorch_synthetic_benchmark.py --model mlp --ddp
    kolorun -np 2 python ffi/python/examples/pytorch_synthetic_benchmark.py --model resnet18 --image-size 64

--model is `mlp` (built in) or any torchvision.models name (needs torchvision).
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F


def build(name, image_size, num_classes):
    if name == "mlp":
        d = 3 * image_size * image_size
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, num_classes))
    import torchvision.models

    return getattr(torchvision.models, name)(num_classes=num_classes)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-warmup-batches", type=int, default=5)
    p.add_argument("--num-batches-per-iter", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--fp16-allreduce", action="store_true", help="fp16 gradients on the wire")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--ddp", action="store_true", help="PyTorch DistributedDataParallel (gloo) instead of kolo")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    if a.ddp:
        import torch.distributed as dist

        # Under kolorun: take rank and size from its variables; DDP's store on another port.
        os.environ.setdefault("RANK", os.environ.get("KOLO_RANK", "0"))
        os.environ.setdefault("WORLD_SIZE", os.environ.get("KOLO_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", os.environ.get("KOLO_MASTER_ADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", str(int(os.environ.get("KOLO_MASTER_PORT", "29500")) + 7))
        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        import kolo.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()

    torch.manual_seed(0)
    model = build(a.model, a.image_size, 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if a.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        comp = hvd.Compression.fp16 if a.fp16_allreduce else hvd.Compression.none
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    data = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
    target = torch.randint(0, 1000, (a.batch_size,))

    def batch():
        opt.zero_grad()
        F.cross_entropy(model(data), target).backward()
        opt.step()

    for _ in range(a.num_warmup_batches):
        batch()
    rates = []
    for i in range(a.num_iters):
        t0 = time.perf_counter()
        for _ in range(a.num_batches_per_iter):
            batch()
        rates.append(a.batch_size * a.num_batches_per_iter / (time.perf_counter() - t0))
        if rank == 0:
            print(f"iter {i}: {rates[-1]:.1f} img/s per rank")
    mean = sum(rates) / len(rates)
    if rank == 0:
        how = "ddp-gloo" if a.ddp else "kolo" + ("-fp16" if a.fp16_allreduce else "")
        print(f"model={a.model} image={a.image_size} batch={a.batch_size} ranks={size} {how}: {mean:.1f} img/s per rank, {mean * size:.1f} img/s total")
    if a.ddp:
        dist.destroy_process_group()
    else:
        hvd.shutdown()


if __name__ == "__main__":
    main()
