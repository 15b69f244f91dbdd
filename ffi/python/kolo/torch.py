"""kolo.torch: Horovod's PyTorch API over kolo's C ABI.

A script written for Horovod runs with its import changed::

    import kolo.torch as hvd
    hvd.init()
    model = ...
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # gradients are sent as backward produces them
        opt.step()                        # waits for the rest, then steps

Launch with ``kolorun -np 4 python train.py``. Every collective runs on kolo's
engine (named, negotiated, fused), so ranks may submit tensors in any order.
CPU tensors are passed in place through ``data_ptr()``; CUDA tensors are
staged through pinned host buffers on a side stream (untested here: no GPU).
The GIL is released while kolo waits or works (ctypes.CDLL).
"""

import ctypes
import itertools
import pickle
import threading

import torch

from . import KoloError, _check, last_error
from ._lib import handle_p, lib

# Reduction ops, with Horovod's names (the values are kolo.h's kolo_op).
Sum, Product, Min, Max, Average = 1, 2, 3, 4, 5

_KOLO_DTYPE = {
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
    torch.float32: 6,
    torch.float64: 7,
}


class Compressor:
    """Horovod's compression interface: ``compress(t) -> (t', ctx)``,
    ``decompress(t', ctx) -> t``. kolo's float32 wire compression (``wire``)
    is applied inside the engine; other dtypes go through compress/decompress."""

    wire = None

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class NoneCompressor(Compressor):
    """No compression."""


class _CastCompressor(Compressor):
    """Floating-point tensors travel as ``cast``; float32 ones use kolo's
    on-the-wire form (f32 accumulation) instead of a cast in Python."""

    cast = None

    @classmethod
    def compress(cls, tensor):
        if tensor.is_floating_point() and tensor.dtype != cls.cast:
            return tensor.to(cls.cast), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor if ctx is None else tensor.to(ctx)


class FP16Compressor(_CastCompressor):
    """IEEE half precision on the wire."""

    wire, cast = "fp16", torch.float16


class BF16Compressor(_CastCompressor):
    """bfloat16 on the wire."""

    wire, cast = "bf16", torch.bfloat16


class TopKCompressor(Compressor):
    """kolo's top-k sparsification with error feedback (float32 only; other
    dtypes are sent as they are). ``Compression.topk`` keeps 1%;
    ``Compression.topk_density(0.05)`` makes another."""

    wire = "topk"


class Compression:
    """Horovod's ``hvd.Compression``: none, fp16, plus kolo's bf16 and topk."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
    topk = TopKCompressor

    @staticmethod
    def topk_density(density):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"top-k density must be in (0, 1], got {density}")
        return type("TopKCompressor", (TopKCompressor,), {"wire": f"topk:{density}"})


# ---------------------------------------------------------------------------
# The communicator.


class _State:
    comm = None
    rank = size = local_rank = local_size = None
    lock = threading.Lock()
    counters = {}
    handles = {}
    next_handle = itertools.count(1)


_S = _State()


def init(comm=None):
    """Join the job described by the launcher's environment (kolorun,
    torchrun, mpirun, srun) and start kolo's engine. Collective; idempotent."""
    if comm is not None:
        raise NotImplementedError("kolo.torch.init: sub-communicators are not supported")
    with _S.lock:
        if _S.comm is not None:
            return
        p = ctypes.c_void_p()
        _check(lib.kolo_init_from_env(ctypes.byref(p)))
        vals = []
        for f in (lib.kolo_comm_rank, lib.kolo_comm_size, lib.kolo_comm_local_rank, lib.kolo_comm_local_size):
            x = ctypes.c_int()
            _check(f(p, ctypes.byref(x)))
            vals.append(x.value)
        _S.comm = p
        _S.rank, _S.size, _S.local_rank, _S.local_size = vals
        _S.counters = {}
        _S.handles = {}
    # Start the engine on every rank now, at the same point: from here on
    # every call (barrier included) is an engine operation.
    synchronize(allreduce_async_(torch.zeros(1, dtype=torch.uint8), name="kolo_torch.init", op=Sum))


def shutdown():
    """Stop the engine and close the connections (pending operations fail)."""
    with _S.lock:
        p, _S.comm = _S.comm, None
        pending = list(_S.handles.values())
        _S.handles = {}
    if p is None:
        return
    rc = lib.kolo_comm_destroy(p)
    for h in pending:  # the engine has failed them; free the C handles
        h.free()
    _check(rc)


def is_initialized():
    return _S.comm is not None


def _comm():
    if _S.comm is None:
        raise ValueError("kolo.torch has not been initialized; call kolo.torch.init() first")
    return _S.comm


def rank():
    _comm()
    return _S.rank


def size():
    _comm()
    return _S.size


def local_rank():
    _comm()
    return _S.local_rank


def local_size():
    _comm()
    return _S.local_size


def cross_size():
    """Number of hosts, for hosts with the same number of ranks (kolorun fills them in order)."""
    return size() // local_size()


def cross_rank():
    """This rank's host index, under the same assumption as cross_size()."""
    return rank() // local_size()


def is_homogeneous():
    return size() % local_size() == 0


# Horovod's build queries, for scripts that branch on them: kolo has one
# transport (TCP and shared memory) and none of these.
def mpi_threads_supported():
    return False


def mpi_built():
    return False


def mpi_enabled():
    return False


def gloo_built():
    return False


def gloo_enabled():
    return False


def nccl_built():
    return False


def cuda_built():
    return False


def rocm_built():
    return False


def _name(kind, name):
    """The tensor's name: the caller's, else ``<kind>.noname.<n>``, counted per
    kind, so unnamed calls made in the same order get the same names on every rank."""
    if name is not None:
        if not isinstance(name, str) or "\0" in name:
            raise TypeError(f"name must be a str without NUL characters, got {name!r}")
        return name
    with _S.lock:
        n = _S.counters.get(kind, 0)
        _S.counters[kind] = n + 1
    return f"{kind}.noname.{n}"


def _dtype(t, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    try:
        return _KOLO_DTYPE[t.dtype]
    except KeyError:
        names = ", ".join(str(d) for d in _KOLO_DTYPE)
        raise TypeError(f"{what}: dtype {t.dtype} is not supported by kolo (supported: {names})") from None


def _checked(t, what):
    """kolo's dtype for `t`, after checking what must hold before anything is sent."""
    d = _dtype(t, what)
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor of shape {tuple(t.shape)} is not contiguous; pass tensor.contiguous()")
    if t.is_sparse:
        raise ValueError(f"{what}: sparse tensors are not supported")
    return d


# ---------------------------------------------------------------------------
# Staging: CPU tensors in place; CUDA tensors through pinned host memory.


class _Stage:
    """Host memory for a tensor: the tensor itself on the CPU, else a pinned
    copy made on a side stream (UNTESTED: this machine has no GPU)."""

    def __init__(self, t, copy_in=True):
        self.device = t
        if t.device.type == "cpu":
            self.host = t
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if copy_in:
            stream = torch.cuda.Stream(device=t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
            stream.synchronize()

    def finish(self, out=None):
        """Copy the host result back to the device tensor (or `out`)."""
        dst = self.device if out is None else out
        if dst.data_ptr() != self.host.data_ptr():
            if dst.device.type == "cpu":
                dst.copy_(self.host)
            else:
                stream = torch.cuda.Stream(device=dst.device)
                with torch.cuda.stream(stream):
                    dst.copy_(self.host, non_blocking=True)
                stream.synchronize()
        return dst


class _Handle:
    """One operation in flight: C handles, the tensors they use (kept alive
    until the wait), and what turns the raw result into the output."""

    def __init__(self, name, cs, keep, finish):
        self.name, self.cs, self.keep, self.finish = name, cs, keep, finish
        self.error = None

    def poll(self):
        done = ctypes.c_int()
        for c in self.cs:
            if c is not None:
                _check(lib.kolo_test(c, ctypes.byref(done)))
                if not done.value:
                    return False
        return True

    def wait(self):
        for i, c in enumerate(self.cs):
            if c is not None:
                self.cs[i] = None
                rc = lib.kolo_wait(c)  # GIL released while it waits
                if rc != 0 and self.error is None:
                    self.error = KoloError(rc, last_error())
        if self.error is not None:
            raise self.error
        return self.finish()

    def free(self):
        for i, c in enumerate(self.cs):
            if c is not None:
                self.cs[i] = None
                lib.kolo_wait(c)


def _register(h):
    with _S.lock:
        hid = next(_S.next_handle)
        _S.handles[hid] = h
    return hid


def _start(fn, *args):
    """Call a kolo_*_async function; returns the C handle."""
    c = handle_p()
    _check(fn(_comm(), *args, ctypes.byref(c)))
    return c


def poll(handle):
    """True once the operation of `handle` has finished; never blocks."""
    h = _S.handles.get(handle)
    if h is None:
        raise ValueError(f"unknown or already synchronized handle {handle}")
    return h.poll()


def synchronize(handle):
    """Wait for the operation of `handle` and return its output."""
    with _S.lock:
        h = _S.handles.pop(handle, None)
    if h is None:
        raise ValueError(f"unknown or already synchronized handle {handle}")
    return h.wait()


# ---------------------------------------------------------------------------
# Allreduce.


def _op_of(average, op):
    if op is None:
        return Sum if average is False else Average
    if average is not None:
        raise ValueError("kolo.torch: pass either average= or op=, not both")
    if op not in (Sum, Product, Min, Max, Average):
        raise ValueError(f"unknown op {op!r} (kolo.torch.Sum, Product, Min, Max, Average)")
    return op


def _allreduce_into(out, name, op, compression, prescale, postscale):
    """Start an in-place allreduce of `out` (contiguous, checked); returns a handle id."""
    wire = compression.wire if out.dtype == torch.float32 else None
    ctx = None
    if wire is None and compression is not NoneCompressor:
        sent, ctx = compression.compress(out)
    else:
        sent = out
    d = _checked(sent, f"allreduce {name!r}")
    if prescale != 1.0:
        sent.mul_(prescale)
    stage = _Stage(sent)
    buf = stage.host
    ptr, n = buf.data_ptr(), buf.numel()
    if wire is not None:
        c = _start(lib.kolo_allreduce_async_compressed, name.encode(), ptr, n, d, op, wire.encode())
    else:
        c = _start(lib.kolo_allreduce_async, name.encode(), ptr, n, d, op)

    def finish():
        stage.finish()
        res = compression.decompress(sent, ctx)
        if res is not out:
            out.copy_(res)
        if postscale != 1.0:
            out.mul_(postscale)
        return out

    return _register(_Handle(name, [c], (out, sent, stage), finish))


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, compression=Compression.none, process_set=None):
    """Start an in-place allreduce of `tensor`; returns a handle for synchronize()."""
    _dtype(tensor, "allreduce_async_")
    _checked(tensor, "allreduce_async_")
    op = _op_of(average, op)
    return _allreduce_into(tensor, _name("allreduce", name), op, compression, prescale_factor, postscale_factor)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, compression=Compression.none, process_set=None):
    """Start an allreduce of a copy of `tensor`; synchronize() returns the result."""
    _checked(tensor, "allreduce_async")
    op = _op_of(average, op)
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return _allreduce_into(out, _name("allreduce", name), op, compression, prescale_factor, postscale_factor)


class _AllreduceFn(torch.autograd.Function):
    """Differentiable allreduce (Sum, Average): the gradient is reduced the same way."""

    @staticmethod
    def forward(ctx, tensor, name, op, pre, post, compression):
        ctx.args = (op, pre, post)
        return synchronize(allreduce_async(tensor, None, name, op, pre, post, compression))

    @staticmethod
    def backward(ctx, grad):
        op, pre, post = ctx.args
        return allreduce(grad.contiguous(), op=op, prescale_factor=pre, postscale_factor=post), None, None, None, None, None


def _differentiable(tensor):
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled()


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """The reduction of `tensor` over all ranks (Average by default), as a new tensor;
    differentiable for Sum and Average, as in Horovod."""
    op = _op_of(average, op)
    if _differentiable(tensor) and op in (Sum, Average):
        _checked(tensor, "allreduce")
        return _AllreduceFn.apply(tensor, _name("allreduce", name), op, prescale_factor, postscale_factor, compression)
    return synchronize(allreduce_async(tensor, None, name, op, prescale_factor, postscale_factor, compression))


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, compression=Compression.none, process_set=None):
    """Reduce `tensor` in place over all ranks; returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, compression))


def _grouped_async(outs, name, op, prescale, postscale):
    for i, t in enumerate(outs):
        _checked(t, f"grouped_allreduce {name!r}[{i}]")
    group = _name("grouped_allreduce", name)
    n = len(outs)
    stages = [_Stage(t) for t in outs]
    for s in stages:
        if prescale != 1.0:
            s.host.mul_(prescale)
    names = [f"{group}.{i}".encode() for i in range(n)]
    c_names = (ctypes.c_char_p * n)(*names)
    c_bufs = (ctypes.c_void_p * n)(*[s.host.data_ptr() for s in stages])
    c_counts = (ctypes.c_size_t * n)(*[s.host.numel() for s in stages])
    c_dtypes = (ctypes.c_int * n)(*[_KOLO_DTYPE[t.dtype] for t in outs])
    hs = (handle_p * n)()
    _check(lib.kolo_grouped_allreduce_async(_comm(), group.encode(), n, c_names, c_bufs, c_counts, c_dtypes, op, hs))

    def finish():
        for s in stages:
            s.finish()
            if postscale != 1.0:
                s.device.mul_(postscale)
        return list(outs)

    return _register(_Handle(group, list(hs), (outs, stages, names), finish))


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Start one atomic group of allreduces on copies; synchronize() returns the list."""
    op = _op_of(average, op)
    for i, t in enumerate(tensors):
        _checked(t, f"grouped_allreduce[{i}]")
    outs = [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
    return _grouped_async(outs, name, op, prescale_factor, postscale_factor)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """In-place form of grouped_allreduce_async."""
    return _grouped_async(list(tensors), name, _op_of(average, op), prescale_factor, postscale_factor)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Allreduce a list of tensors as one group (they run together); returns new tensors."""
    ctxs = [compression.compress(t) for t in tensors]
    outs = synchronize(grouped_allreduce_async([c[0] for c in ctxs], average, name, op, prescale_factor, postscale_factor))
    return [compression.decompress(o, c[1]) for o, c in zip(outs, ctxs)]


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """In-place grouped allreduce; returns the tensors."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor))


# ---------------------------------------------------------------------------
# Allgather, broadcast, alltoall.

_MAX_DIMS = 8


def _gather_shapes(t, name):
    """Every rank's shape of `t`; raises the same ValueError on every rank when
    their dimensions other than the first disagree (so no rank hangs)."""
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"allgather {name!r}: at most {_MAX_DIMS} dimensions")
    mine = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64)
    mine[0] = t.dim()
    mine[1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    n = size()
    allv = torch.empty(n * (_MAX_DIMS + 1), dtype=torch.int64)
    c = _start(lib.kolo_allgather_async, f"{name}.shapes".encode(), mine.data_ptr(), mine.numel(), allv.data_ptr(), allv.numel(), 3)
    _Handle(name, [c], (mine, allv), lambda: None).wait()
    shapes = [tuple(int(x) for x in row[1 : 1 + int(row[0])]) for row in allv.view(n, -1)]
    if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] or len(s) == 0 for s in shapes):
        raise ValueError(f"allgather {name!r}: ranks' shapes differ beyond the first dimension: {shapes}")
    return shapes


def allgather_async(tensor, name=None, process_set=None):
    """Start an allgather: every rank's tensor concatenated along the first
    dimension, which may differ between ranks (their sizes are exchanged first)."""
    d = _checked(tensor, f"allgather {name!r}")
    if tensor.dim() == 0:
        raise ValueError(f"allgather {name!r}: a tensor with at least one dimension is needed")
    name = _name("allgather", name)
    shapes = _gather_shapes(tensor, name)
    rows = sum(s[0] for s in shapes)
    stage = _Stage(tensor)
    out = torch.empty((rows,) + shapes[0][1:], dtype=tensor.dtype, device=tensor.device)
    host_out = torch.empty(out.shape, dtype=out.dtype) if out.device.type != "cpu" else out
    c = _start(lib.kolo_allgather_async, name.encode(), stage.host.data_ptr(), stage.host.numel(), host_out.data_ptr(), host_out.numel(), d)

    def finish():
        if host_out is not out:
            out.copy_(host_out)
        return out

    return _register(_Handle(name, [c], (stage, host_out), finish))


class _AllgatherFn(torch.autograd.Function):
    """Differentiable allgather: this rank's rows of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor, name):
        ctx.rows = tensor.shape[0]
        return synchronize(allgather_async(tensor, name))

    @staticmethod
    def backward(ctx, grad):
        summed = allreduce(grad.contiguous(), op=Sum)
        rows = allgather(torch.tensor([ctx.rows], dtype=torch.int64))
        start = int(rows[: rank()].sum())
        return summed.narrow(0, start, ctx.rows), None


def allgather(tensor, name=None, process_set=None):
    """Every rank's tensor concatenated along the first dimension (may differ per
    rank); differentiable, as in Horovod."""
    if _differentiable(tensor):
        _checked(tensor, "allgather")
        return _AllgatherFn.apply(tensor, _name("allgather", name))
    return synchronize(allgather_async(tensor, name))


def broadcast_async_(tensor, root_rank, name=None, process_set=None):
    """Start an in-place broadcast of root_rank's `tensor`."""
    d = _checked(tensor, f"broadcast {name!r}")
    name = _name("broadcast", name)
    stage = _Stage(tensor)
    c = _start(lib.kolo_broadcast_async, name.encode(), stage.host.data_ptr(), stage.host.numel(), d, int(root_rank))
    return _register(_Handle(name, [c], (stage,), stage.finish))


def broadcast_async(tensor, root_rank, name=None, process_set=None):
    """Start a broadcast of root_rank's `tensor` into a new tensor."""
    _checked(tensor, "broadcast")
    return broadcast_async_(tensor.detach().clone(), root_rank, name)


def broadcast(tensor, root_rank, name=None, process_set=None):
    """root_rank's `tensor`, as a new tensor on every rank."""
    return synchronize(broadcast_async(tensor, root_rank, name))


def broadcast_(tensor, root_rank, name=None, process_set=None):
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name))


def alltoall(tensor, splits=None, name=None, process_set=None):
    """Scatter slices of `tensor`'s first dimension to the ranks and gather
    theirs. Without `splits` the first dimension is divided evenly; with it,
    slice j (``splits[j]`` rows) goes to rank j and the result is
    ``(output, received_splits)``, as in Horovod."""
    d = _checked(tensor, f"alltoall {name!r}")
    name = _name("alltoall", name)
    n = size()
    rest = tuple(tensor.shape[1:])
    row = 1
    for x in rest:
        row *= x
    if splits is None:
        if tensor.shape[0] % n:
            raise ValueError(f"alltoall {name!r}: first dimension {tensor.shape[0]} is not a multiple of size {n}")
        stage = _Stage(tensor)
        out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        host_out = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
        c = _start(lib.kolo_alltoall_async, name.encode(), stage.host.data_ptr(), host_out.data_ptr(), tensor.numel() // n, d)
        _Handle(name, [c], (stage, host_out), lambda: None).wait()
        return out.copy_(host_out) if host_out is not out else out
    splits = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    if len(splits) != n or any(s < 0 for s in splits) or sum(splits) != tensor.shape[0]:
        raise ValueError(f"alltoall {name!r}: splits {splits} must be {n} non-negative counts summing to {tensor.shape[0]}")
    # Uneven slices: exchange the split table, pad every slice to the largest, trim after.
    table = allgather(torch.tensor([splits], dtype=torch.int64), name=f"{name}.splits")
    recv = [int(x) for x in table[:, rank()]]
    width = int(table.max()) if table.numel() else 0
    padded = torch.zeros((n * width,) + rest, dtype=tensor.dtype)
    host = tensor.cpu()
    off = 0
    for j, s in enumerate(splits):
        padded[j * width : j * width + s] = host[off : off + s]
        off += s
    got = alltoall(padded, name=f"{name}.padded") if width else padded
    out = torch.cat([got[j * width : j * width + recv[j]] for j in range(n)]).to(tensor.device)
    return out, torch.tensor(recv, dtype=torch.int32)


# ---------------------------------------------------------------------------
# Join, barrier, objects, parameters.


def join(device=-1):
    """This rank has no more batches: take part in the other ranks'
    allreduces with zeros until all have joined (averages divide by the ranks
    that contributed). Returns the last rank to join."""
    last = ctypes.c_int()
    _check(lib.kolo_join(_comm(), ctypes.byref(last)))
    return last.value


def barrier(process_set=None):
    """Return once every rank has entered the barrier."""
    _check(lib.kolo_barrier(_comm()))


def broadcast_object(obj, root_rank=0, name=None, process_set=None):
    """root_rank's `obj` (pickled) on every rank."""
    name = _name("broadcast_object", name)
    if rank() == root_rank:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    broadcast_(length, root_rank, name=f"{name}.len")
    if rank() != root_rank:
        data = torch.zeros(int(length[0]), dtype=torch.uint8)
    broadcast_(data, root_rank, name=f"{name}.data")
    return obj if rank() == root_rank else pickle.loads(data.numpy().tobytes())


def allgather_object(obj, name=None, process_set=None):
    """Every rank's `obj` (pickled), in rank order."""
    name = _name("allgather_object", name)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = allgather(torch.tensor([data.numel()], dtype=torch.int64), name=f"{name}.len")
    allb = allgather(data, name=f"{name}.data").numpy().tobytes()
    out, off = [], 0
    for s in sizes.tolist():
        out.append(pickle.loads(allb[off : off + s]))
        off += s
    return out


def broadcast_parameters(params, root_rank):
    """Overwrite `params` (a state_dict, or named_parameters()) with root_rank's, in place."""
    if isinstance(params, dict):
        items = sorted(params.items())
    else:
        items = list(params)
        if items and not (isinstance(items[0], tuple) and len(items[0]) == 2):
            raise ValueError("broadcast_parameters: pass a state_dict or named_parameters()")
    handles = []
    for name, p in items:
        if isinstance(p, torch.Tensor):
            handles.append(broadcast_async_(p.data if isinstance(p, torch.nn.Parameter) else p, root_rank, name=f"broadcast.{name}"))
    for h in handles:
        synchronize(h)


def broadcast_optimizer_state(optimizer, root_rank):
    """Make `optimizer`'s state (hyperparameters of every param group and the
    per-parameter state, momentum buffers included) root_rank's on every rank."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    state = broadcast_object(optimizer.state_dict(), root_rank, name="broadcast_optimizer_state")
    if rank() != root_rank:
        optimizer.load_state_dict(state)


from ._optimizer import DistributedOptimizer  # noqa: E402,F401
