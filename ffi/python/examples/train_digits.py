"""Data-parallel training on the 8x8 digits set shipped in examples/data (1438 training
and 359 test images) with kolo.torch, the Python twin of examples/train_digits.rs:

    kolorun -np 4 python ffi/python/examples/train_digits.py --epochs 20

Every rank builds the model from its own seed and rank 0's parameters are broadcast;
each global batch is split across the ranks, and each rank's loss is its share of the
global batch's mean loss, so the averaged gradient is the one a single process would
compute on the whole batch. Rank 0 prints the test accuracy per epoch and ends with
``final_accuracy=<fraction>``.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import kolo.torch as hvd

DATA = Path(__file__).resolve().parents[3] / "examples" / "data" / "digits.bin"


def load(path):
    """Records of 65 bytes: 64 pixels in 0..=16 (row-major 8x8), then the label.
    Every 5th image (index % 5 == 4) is the test set, as in examples/data/digits.rs."""
    raw = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).reshape(-1, 65)
    x = torch.from_numpy(raw[:, :64].astype(np.float32) / 16.0)
    y = torch.from_numpy(raw[:, 64].astype(np.int64))
    test = torch.arange(len(y)) % 5 == 4
    return (x[~test], y[~test]), (x[test], y[test])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split across the ranks")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, momentum 0.9, cosine decay)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--fp16-allreduce", action="store_true", help="fp16 gradients on the wire")
    a = p.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    rank, n = hvd.rank(), hvd.size()
    if a.batch_size % n:
        raise SystemExit(f"--batch-size {a.batch_size} is not a multiple of the {n} ranks")
    (xtr, ytr), (xte, yte) = load(a.data)
    torch.manual_seed(a.seed + rank)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, a.hidden), torch.nn.ReLU(), torch.nn.Linear(a.hidden, a.hidden), torch.nn.ReLU(), torch.nn.Linear(a.hidden, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    comp = hvd.Compression.fp16 if a.fp16_allreduce else hvd.Compression.none
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    steps_per_epoch = len(ytr) // a.batch_size
    total, step, local = a.epochs * steps_per_epoch, 0, a.batch_size // n
    acc = 0.0
    for epoch in range(a.epochs):
        t0 = time.monotonic()
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(a.seed * 1000 + epoch))
        model.train()
        for b in range(steps_per_epoch):
            idx = order[b * a.batch_size + rank * local : b * a.batch_size + (rank + 1) * local]
            for g in opt.param_groups:
                g["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            # This rank's share of the global batch's mean loss; the average over ranks
            # (times n) is the whole batch's gradient.
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx], reduction="sum") / local
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        if rank == 0:
            dt = time.monotonic() - t0
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test accuracy {acc:.4f}  {dt:.2f} s  {steps_per_epoch * a.batch_size / dt:.0f} img/s")
    if rank == 0:
        print(f"final_accuracy={acc:.4f}")
    hvd.shutdown()


if __name__ == "__main__":
    main()
