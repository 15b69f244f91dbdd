"""Test of ffi/python/kolo.py under kolorun (ffi/tests/c_api.rs runs it with -np 3).

Calls every function on every dtype and op and checks the results bitwise against
references computed here with numpy; checks that invalid calls raise or return the right
status with kolo's message; ends with a count mismatch across ranks. Prints
"test_kolo.py: passed" on success.

    kolorun -np 3 .venv/bin/python ffi/tests/python/test_kolo.py
    KOLO_RANK=0 KOLO_SIZE=1 KOLO_TIMEOUT=bogus python test_kolo.py --init-error
"""

import ctypes
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import kolo  # noqa: E402

DTYPES = {
    kolo.UINT8: np.uint8,
    kolo.INT32: np.int32,
    kolo.INT64: np.int64,
    kolo.FLOAT16: np.float16,
    kolo.BFLOAT16: np.uint16,  # bfloat16 bits
    kolo.FLOAT32: np.float32,
    kolo.FLOAT64: np.float64,
}
NAMES = {1: "uint8", 2: "int32", 3: "int64", 4: "float16", 5: "bfloat16", 6: "float32", 7: "float64"}
OPS = {kolo.SUM: "sum", kolo.PROD: "prod", kolo.MIN: "min", kolo.MAX: "max", kolo.AVG: "avg"}
COUNTS = [1, 7, 1000, 70001]
INTS = (kolo.UINT8, kolo.INT32, kolo.INT64)


def encode(d, values):
    """float64 values (exact small integers, or anything for ints) -> array of dtype d."""
    if d == kolo.BFLOAT16:
        return kolo.to_bfloat16(np.asarray(values, np.float32))
    return np.asarray(values).astype(DTYPES[d])


def decode(d, a):
    return kolo.from_bfloat16(a).astype(np.float64) if d == kolo.BFLOAT16 else a.astype(np.float64)


def gen(d, op, r, count, salt, n):
    """Input of rank r: full-range integers (sums and products wrap); small integer floats
    whose sums and products are exact in every float type, whatever the order."""
    rng = np.random.default_rng([r, d, op, salt, count])
    if d in INTS:
        info = np.iinfo(DTYPES[d])
        return rng.integers(info.min, info.max, count, dtype=DTYPES[d], endpoint=True)
    if op == kolo.PROD:
        return encode(d, rng.choice([-2.0, -1.0, 1.0, 2.0], count))
    k = 120 // n
    return encode(d, rng.integers(-k, k, count, endpoint=True).astype(np.float64))


def reference(d, op, inputs, n):
    if d in INTS:
        with np.errstate(over="ignore"):
            f = {kolo.SUM: np.add, kolo.AVG: np.add, kolo.PROD: np.multiply, kolo.MIN: np.minimum, kolo.MAX: np.maximum}[op]
            acc = functools.reduce(f, inputs)
        if op == kolo.AVG:  # truncating division, as C and Rust
            q = acc // n
            q[(acc % n != 0) & (acc < 0)] += 1
            acc = q.astype(acc.dtype)
        return acc
    vals = [decode(d, x) for x in inputs]
    f = {kolo.SUM: np.add, kolo.AVG: np.add, kolo.PROD: np.multiply, kolo.MIN: np.minimum, kolo.MAX: np.maximum}[op]
    acc = functools.reduce(f, vals)  # exact
    if op == kolo.AVG:
        if d == kolo.FLOAT64:
            acc = acc / n
        else:  # float16/bfloat16: quotient in float32, rounded once
            acc = (acc.astype(np.float32) / np.float32(n)).astype(np.float64)
    return encode(d, acc)


failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print(f"check failed: {msg}", file=sys.stderr)


def same(what, got, want):
    g, w = np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8)
    if g.shape != w.shape or not np.array_equal(g, w):
        bad = np.flatnonzero(got != want)
        i = int(bad[0]) if bad.size else -1
        check(False, f"{what}: element {i}: {got[i] if i >= 0 else got} != {want[i] if i >= 0 else want}")


def same_on_all_ranks(comm, what, a):
    b = np.ascontiguousarray(a).view(np.uint8)
    all_ = comm.allgather(b)
    for r in range(comm.size):
        check(np.array_equal(all_[r * b.size:(r + 1) * b.size], b), f"{what}: rank {r} differs")


def test_collectives(comm):
    n, me = comm.size, comm.rank
    for d in DTYPES:
        kw = {"dtype": kolo.BFLOAT16} if d == kolo.BFLOAT16 else {}
        for count in COUNTS:
            tag = f"{NAMES[d]} count {count}"
            for op in OPS:
                ins = [gen(d, op, r, count, 1, n) for r in range(n)]
                want = reference(d, op, ins, n)
                send = ins[me].copy()
                out = comm.allreduce(send, np.empty_like(send), op=op, **kw)
                same(f"allreduce {OPS[op]} {tag}", out, want)
                same(f"allreduce {OPS[op]} {tag} left send alone", send, ins[me])
                comm.allreduce(send, op=op, **kw)
                same(f"allreduce in place {OPS[op]} {tag}", send, want)
                ins = [gen(d, op, r, count * n, 2, n) for r in range(n)]
                want = reference(d, op, ins, n)[me * count:(me + 1) * count]
                same(f"reduce_scatter {OPS[op]} {tag}", comm.reduce_scatter(ins[me], op=op, **kw), want)
            for root in range(n):
                want = gen(d, kolo.SUM, root, count, 3 + root, n)
                buf = want.copy() if me == root else np.zeros_like(want)
                same(f"broadcast root {root} {tag}", comm.broadcast(buf, root, **kw), want)
            ins = [gen(d, kolo.SUM, r, count, 4, n) for r in range(n)]
            same(f"allgather {tag}", comm.allgather(ins[me], **kw), np.concatenate(ins))
            ins = [gen(d, kolo.SUM, r, count * n, 5, n) for r in range(n)]
            want = np.concatenate([ins[r][me * count:(me + 1) * count] for r in range(n)])
            same(f"alltoall {tag}", comm.alltoall(ins[me], **kw), want)
            if d not in INTS:
                x = encode(d, np.random.default_rng([me, d, count]).uniform(-1, 1, count))
                comm.allreduce(x, **kw)
                same_on_all_ranks(comm, f"allreduce of non-integer {tag}", x)
        comm.barrier()


def test_errors(comm):
    lib, inv = kolo.lib, kolo.ERR_INVALID_ARGUMENT
    v = np.zeros(8, np.float32)
    p = v.ctypes.data

    def bad(rc, needle):
        msg = kolo.last_error()
        check(rc == inv, f"status {rc} ({msg}), want {inv}")
        check(needle in msg, f"message {msg!r} lacks {needle!r}")

    bad(lib.kolo_init_from_env(None), "comm is NULL")
    bad(lib.kolo_comm_destroy(None), "kolo_comm_destroy: comm is NULL")
    bad(lib.kolo_comm_rank(None, ctypes.byref(ctypes.c_int())), "kolo_comm_rank: comm is NULL")
    bad(lib.kolo_comm_size(comm._p, None), "size is NULL")
    bad(lib.kolo_allreduce(None, p, p, 8, kolo.FLOAT32, kolo.SUM), "kolo_allreduce: comm is NULL")
    bad(lib.kolo_allreduce(comm._p, p, p, 8, 0, kolo.SUM), "unknown kolo_dtype 0")
    bad(lib.kolo_allreduce(comm._p, p, p, 8, kolo.FLOAT32, 17), "unknown kolo_op 17")
    bad(lib.kolo_allreduce(comm._p, None, None, 8, kolo.FLOAT32, kolo.SUM), "recvbuf is NULL but its count is 8")
    bad(lib.kolo_allreduce(comm._p, p, p, 2**64 - 1, kolo.FLOAT32, kolo.SUM), "overflow")
    bad(lib.kolo_allreduce(comm._p, p + 1, p + 1, 2, kolo.FLOAT32, kolo.SUM), "not aligned")
    bad(lib.kolo_broadcast(comm._p, None, 1, kolo.INT32, 0), "buf is NULL")
    bad(lib.kolo_allgather(comm._p, p, None, 1, kolo.FLOAT32), "recvbuf is NULL")
    bad(lib.kolo_reduce_scatter(comm._p, None, p, 1, kolo.FLOAT32, kolo.SUM), "sendbuf is NULL")
    bad(lib.kolo_alltoall(comm._p, p, p, 2**63, kolo.FLOAT32), "overflow")
    bad(lib.kolo_barrier(None), "kolo_barrier: comm is NULL")
    bad(lib.kolo_version(None, None, None), "major is NULL")
    # Through the module: KoloError with the status, or TypeError/ValueError before C.
    for call, needle in [
        (lambda: comm.broadcast(v, root=-1), "root -1 is negative"),
        (lambda: comm.allreduce(v, op=99), "unknown kolo_op 99"),
        (lambda: comm.allreduce(v, dtype=42), None),
    ]:
        try:
            call()
            check(False, "no exception")
        except kolo.KoloError as e:
            check(e.status == inv and needle in e.message and needle in str(e), f"{e}")
        except TypeError as e:
            check(needle is None, f"{e}")
    for call, exc in [
        (lambda: comm.allreduce(np.zeros(3, np.int16)), TypeError),
        (lambda: comm.allreduce([1.0, 2.0]), TypeError),
        (lambda: comm.allreduce(v, np.zeros(7, np.float32)), ValueError),
        (lambda: comm.allgather(v, np.zeros(8, np.float32)), ValueError),
        (lambda: comm.allreduce(v, np.zeros(8, np.int32)), TypeError),
        (lambda: comm.alltoall(np.zeros(comm.size * 2 + 1, np.int64)), ValueError),
        (lambda: comm.allreduce(np.zeros((4, 4), np.float32)[:, 0]), ValueError),
    ]:
        try:
            call()
            check(False, f"no {exc.__name__}")
        except exc:
            pass
    # None of that reached the network: the communicator still works.
    one = np.ones(3, np.float64)
    comm.allreduce(one)
    same("allreduce after invalid calls", one, np.full(3, float(comm.size)))


def test_mismatch(comm):
    v = np.zeros(9 if comm.rank == 1 else 8, np.float32)
    try:
        comm.allreduce(v)
        check(False, "mismatched allreduce succeeded")
    except kolo.KoloError as e:
        check(e.status in (kolo.ERR_MISMATCH, kolo.ERR_ABORTED), f"{e}")
        check("mismatch" in e.message, e.message)
        try:
            comm.barrier()
            check(False, "barrier after a failure succeeded")
        except kolo.KoloError as e2:
            check(e2.status == e.status, f"{e2}")


def main():
    if sys.argv[1:] == ["--init-error"]:
        try:
            kolo.Comm()
            check(False, "init succeeded")
        except kolo.KoloError as e:
            check(e.status == kolo.ERR_CONFIG and "KOLO_TIMEOUT" in e.message, f"{e}")
        if failures:
            sys.exit(1)
        print("test_kolo.py: passed")
        return
    check(kolo.last_error() == "", kolo.last_error())
    check(kolo.version() >= (0, 1, 0), f"{kolo.version()}")
    codes = [getattr(kolo, c) for c in dir(kolo) if c == "OK" or c.startswith("ERR_")]
    check(len(codes) == 11 and len({kolo.status_string(c) for c in codes}) == 11, f"{codes}")
    check(kolo.status_string(-1000) == "unknown status", kolo.status_string(-1000))
    with kolo.Comm() as comm:
        n, me = comm.size, comm.rank
        check(0 <= comm.rank < n and 0 <= comm.local_rank < n, f"{comm.rank} {comm.local_rank} {n}")
        test_collectives(comm)
        test_errors(comm)
        test_mismatch(comm)
    check(comm._p is None, "close")
    if failures:
        print(f"rank {me}: {len(failures)} checks failed", file=sys.stderr)
        sys.exit(1)
    print(f"test_kolo.py: passed (rank {me} of {n})")


if __name__ == "__main__":
    main()
