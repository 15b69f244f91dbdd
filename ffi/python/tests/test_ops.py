"""Every collective of kolo.torch on torch tensors, against serial references."""

import threading
import time

import pytest
import torch

import kolo.torch as hvd
from conftest import gen

DTYPES = [torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
OPS = [hvd.Sum, hvd.Product, hvd.Min, hvd.Max, hvd.Average]


def reference(op, inputs, dtype, n):
    if op == hvd.Product:
        acc = inputs[0].to(torch.int64)
        for x in inputs[1:]:
            acc = acc * x.to(torch.int64)
        return acc.to(dtype)
    wide = torch.stack([x.to(torch.int64) for x in inputs])
    if op == hvd.Min:
        return wide.min(0).values.to(dtype)
    if op == hvd.Max:
        return wide.max(0).values.to(dtype)
    s = wide.sum(0)
    if op == hvd.Sum:
        return s.to(dtype)
    if dtype.is_floating_point:  # kolo divides once, in the dtype's accumulation type
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (s.to(acc) / n).to(dtype)
    return torch.div(s, n, rounding_mode="trunc").to(dtype)  # integers truncate, as C does


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_allreduce_every_op_and_dtype(dtype, op, n, me):
    kind = "prod" if op == hvd.Product else "small"
    inputs = [gen(r, (5, 7), dtype, seed=op, kind=kind) for r in range(n)]
    want = reference(op, inputs, dtype, n)
    x = inputs[me].clone()
    got = hvd.allreduce(x, op=op)
    assert torch.equal(x, inputs[me]), "allreduce must not change its input"
    assert got.dtype == dtype and got.shape == (5, 7)
    assert torch.equal(got, want), f"{dtype} op {op}: {got} != {want}"
    y = inputs[me].clone()
    assert hvd.allreduce_(y, op=op) is y and torch.equal(y, want)


def test_allreduce_default_is_average_and_scaling(n, me):
    x = torch.full((4,), float(me + 1), dtype=torch.float64)
    assert torch.equal(hvd.allreduce(x), torch.full((4,), (n + 1) / 2, dtype=torch.float64))
    assert torch.equal(hvd.allreduce(x, average=False), torch.full((4,), n * (n + 1) / 2, dtype=torch.float64))
    got = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    assert torch.equal(got, torch.full((4,), n * (n + 1) / 2, dtype=torch.float64))


def test_async_handles_poll_and_synchronize(n, me):
    xs = [torch.full((100 + i,), float(me * i), dtype=torch.float32) for i in range(6)]
    # Submitted in a different order on every rank: the engine matches names.
    order = list(range(6))[me % 6 :] + list(range(6))[: me % 6]
    hs = {i: hvd.allreduce_async_(xs[i], name=f"async.{i}", op=hvd.Sum) for i in order}
    for i in reversed(order):
        while not hvd.poll(hs[i]):
            time.sleep(0.001)
        assert hvd.synchronize(hs[i]) is xs[i]
        assert torch.equal(xs[i], torch.full((100 + i,), float(i * n * (n - 1) / 2)))
    with pytest.raises(ValueError, match="unknown or already synchronized"):
        hvd.synchronize(hs[0])
    h = hvd.allreduce_async(torch.ones(3, dtype=torch.int64), op=hvd.Sum)
    assert torch.equal(hvd.synchronize(h), torch.full((3,), n, dtype=torch.int64))


def test_grouped_allreduce(n, me):
    ts = [gen(me, (3, i + 1), d, seed=40 + i) for i, d in enumerate(DTYPES)]
    want = [reference(hvd.Sum, [gen(r, (3, i + 1), d, seed=40 + i) for r in range(n)], d, n) for i, d in enumerate(DTYPES)]
    got = hvd.grouped_allreduce(ts, op=hvd.Sum)
    for g, w, t in zip(got, want, ts):
        assert g is not t and torch.equal(g, w)
    inplace = [t.clone() for t in ts]
    out = hvd.grouped_allreduce_(inplace, op=hvd.Sum, name="grouped.inplace")
    assert all(o is t and torch.equal(o, w) for o, t, w in zip(out, inplace, want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allgather_uneven_first_dimension(dtype, n, me):
    parts = [gen(r, (r + 1, 2, 3), dtype, seed=50) for r in range(n)]
    got = hvd.allgather(parts[me])
    assert torch.equal(got, torch.cat(parts))
    empty = torch.zeros((0 if me == 0 else 2, 4), dtype=dtype)
    assert hvd.allgather(empty).shape == (2 * (n - 1), 4)


def test_allgather_shape_mismatch_errors_on_every_rank(n, me):
    if n == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError, match="shapes differ"):
        hvd.allgather(torch.zeros((2, 3 + me)))
    assert torch.equal(hvd.allgather(torch.ones(1)), torch.ones(n))  # still usable


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_broadcast_from_every_root(dtype, n, me):
    for root in range(n):
        want = gen(root, (4, 5), dtype, seed=60)
        mine = gen(me, (4, 5), dtype, seed=60)
        got = hvd.broadcast(mine, root_rank=root)
        assert torch.equal(got, want) and torch.equal(mine, gen(me, (4, 5), dtype, seed=60))
        assert hvd.broadcast_(mine, root) is mine and torch.equal(mine, want)


def test_alltoall_even_and_with_splits(n, me):
    x = torch.arange(2 * n * 3, dtype=torch.float64).view(2 * n, 3) + 100 * me
    got = hvd.alltoall(x)
    want = torch.cat([torch.arange(2 * n * 3, dtype=torch.float64).view(2 * n, 3)[2 * me : 2 * me + 2] + 100 * r for r in range(n)])
    assert torch.equal(got, want)
    # Rank r sends j + r + 1 rows to rank j.
    splits = [j + me + 1 for j in range(n)]
    rows = torch.arange(sum(splits), dtype=torch.int32) + 1000 * me
    out, recv = hvd.alltoall(rows, splits=splits)
    assert recv.tolist() == [me + r + 1 for r in range(n)]
    want = []
    for r in range(n):
        theirs = [j + r + 1 for j in range(n)]
        start = sum(theirs[:me])
        want.append(torch.arange(start, start + theirs[me], dtype=torch.int32) + 1000 * r)
    assert torch.equal(out, torch.cat(want))


@pytest.mark.parametrize("comp,bits", [(hvd.Compression.fp16, 11), (hvd.Compression.bf16, 8)])
def test_compressed_allreduce_within_rounding(comp, bits, n, me):
    g = [torch.Generator().manual_seed(70 + r) for r in range(n)]
    xs = [torch.randn(4096, generator=gi) for gi in g]
    exact = torch.stack([x.double() for x in xs]).sum(0)
    got = hvd.allreduce(xs[me], op=hvd.Sum, compression=comp)
    bound = (n + 2) * 2.0 ** (-bits) * torch.stack([x.double().abs() for x in xs]).sum(0) + 1e-6
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max())}"
    if n > 1:  # one rank sends nothing, so nothing is rounded
        assert not torch.equal(got, exact.float()), "compression had no effect"
    # Other float dtypes go through Horovod's cast (compress/decompress).
    d = xs[me].double()
    got64 = hvd.allreduce(d, op=hvd.Sum, compression=comp)
    assert got64.dtype == torch.float64 and bool(((got64 - exact).abs() <= bound).all())
    topk = hvd.allreduce(xs[me], op=hvd.Sum, compression=hvd.Compression.topk_density(1.0))
    assert torch.allclose(topk.double(), exact, atol=1e-4)


def test_join_with_uneven_batches(n, me):
    # Rank r has r + 1 batches; batch i is reduced over the size - i ranks that still have it.
    for i in range(me + 1):
        s = hvd.allreduce(torch.ones(3, dtype=torch.float64), name=f"join.sum.{i}", op=hvd.Sum)
        assert torch.equal(s, torch.full((3,), float(n - i), dtype=torch.float64))
        a = hvd.allreduce(torch.full((2,), float(me + 1), dtype=torch.float64), name=f"join.avg.{i}")
        contributing = range(i, n)
        assert torch.equal(a, torch.full((2,), sum(r + 1 for r in contributing) / len(contributing), dtype=torch.float64))
    assert hvd.join() == n - 1


def test_bad_tensors_raise_before_anything_is_sent(n, me):
    nc = torch.zeros(4, 4)[:, 0]
    for f in (lambda: hvd.allreduce(nc), lambda: hvd.allreduce_async_(nc), lambda: hvd.broadcast_(nc, 0), lambda: hvd.allgather(nc), lambda: hvd.grouped_allreduce([torch.zeros(2), nc])):
        with pytest.raises(ValueError, match="not contiguous"):
            f()
    for dt in (torch.int16, torch.int8, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=f"dtype {dt} is not supported"):
            hvd.allreduce(torch.zeros(3, dtype=dt))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        hvd.allreduce([1.0, 2.0])
    # Nothing was sent, and the unnamed counters did not move: the next unnamed
    # calls still agree on every rank.
    x = torch.full((5,), float(me), dtype=torch.float64)
    assert torch.equal(hvd.allreduce(x, op=hvd.Sum), torch.full((5,), n * (n - 1) / 2, dtype=torch.float64))


def test_other_threads_run_while_one_waits_in_a_collective(n, me):
    if n == 1:
        pytest.skip("a wait needs a peer that comes late")
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        c0 = counter[0]
        time.sleep(0.3)  # the spinning thread's pace while this one sleeps (GIL free)
        pace = (counter[0] - c0) / 0.3
        if me == 0:
            time.sleep(1.0)  # the others wait for rank 0 inside kolo
        before = counter[0]
        t0 = time.monotonic()
        hvd.allreduce(torch.ones(1), name="gil.wait")
        waited = time.monotonic() - t0
        ran = counter[0] - before
    finally:
        stop.set()
        t.join()
    if me != 0:
        assert waited > 0.5, f"rank {me} waited only {waited:.3f} s"
        assert ran > 0.25 * pace * waited, f"the other thread ran {ran} iterations in {waited:.2f} s, {pace:.0f}/s when free: the GIL was held"


def test_broadcast_object_and_allgather_object(n, me):
    obj = {"rank": me, "data": list(range(me))}
    assert hvd.broadcast_object(obj, root_rank=n - 1) == {"rank": n - 1, "data": list(range(n - 1))}
    assert hvd.allgather_object(obj) == [{"rank": r, "data": list(range(r))} for r in range(n)]


def test_rank_size_and_unnamed_names(n, me):
    assert 0 <= hvd.rank() < hvd.size() and hvd.local_size() == n and hvd.local_rank() == me
    assert hvd.is_initialized()
    assert (hvd.cross_size(), hvd.cross_rank(), hvd.is_homogeneous()) == (1, 0, True)  # one host
    assert not hvd.nccl_built() and not hvd.mpi_threads_supported()
    hvd.barrier()


def test_allreduce_and_allgather_are_differentiable(n, me):
    x = torch.full((3,), float(me + 1), dtype=torch.float64, requires_grad=True)
    y = hvd.allreduce(x, op=hvd.Sum)
    assert torch.equal(y.detach(), torch.full((3,), n * (n + 1) / 2, dtype=torch.float64))
    (y * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    # Every rank's loss depends on x through the sum: the gradient is summed too.
    assert torch.equal(x.grad, n * torch.arange(3.0, dtype=torch.float64))
    a = torch.ones((me + 1, 2), dtype=torch.float64, requires_grad=True)
    g = hvd.allgather(a)
    w = torch.arange(float(g.numel()), dtype=torch.float64).view(g.shape)
    (g * w).sum().backward()
    start = sum(r + 1 for r in range(me))
    assert torch.equal(a.grad, n * w[start : start + me + 1])
