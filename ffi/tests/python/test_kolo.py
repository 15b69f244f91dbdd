"""Test of the kolo package's numpy API (ffi/python/kolo) under kolorun (ffi/tests/c_api.rs runs it with -np 3).

Calls every function on every dtype and op and checks the results bitwise against
references computed here with numpy; checks that invalid calls raise or return the right
status with kolo's message. Then starts the engine with asynchronous named allreduces
(submitted in a different order on every rank, mixed with blocking calls), runs the
blocking collectives again through the engine, and ends with mismatches across ranks,
which the engine reports on every rank and survives. Prints "test_kolo.py: passed" on
success.

    kolorun -np 3 .venv/bin/python ffi/tests/python/test_kolo.py
    kolorun -np 3 .venv/bin/python ffi/tests/python/test_kolo.py --sync-mismatch
    KOLO_RANK=0 KOLO_SIZE=1 KOLO_TIMEOUT=bogus python test_kolo.py --init-error
"""

import ctypes
import functools
import sys
import time
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


def test_collectives(comm, counts=COUNTS):
    n, me = comm.size, comm.rank
    for d in DTYPES:
        kw = {"dtype": kolo.BFLOAT16} if d == kolo.BFLOAT16 else {}
        for count in counts:
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


NT = 10


def test_async(comm, d, count, salt):
    """NT named allreduces of dtype d, the ops cycling through every op, each rank
    submitting them in its own order with blocking calls in between, then waiting in
    another order, half of them by polling test(). The names repeat (the engine's cache)."""
    n, me = comm.size, comm.rank
    kw = {"dtype": kolo.BFLOAT16} if d == kolo.BFLOAT16 else {}
    ops = [list(OPS)[i % len(OPS)] for i in range(NT)]
    ins = [[gen(d, ops[i], r, count + 3 * i, salt + i, n) for r in range(n)] for i in range(NT)]
    wants = [reference(d, ops[i], ins[i], n) for i in range(NT)]
    order = [(3 * i + 7 * me) % NT for i in range(NT)]
    if me % 2:
        order.reverse()
    handles = {}
    for j, i in enumerate(order):
        h = comm.allreduce_async(f"t.{NAMES[d]}.{count}.{i}", ins[i][me].copy(), op=ops[i], **kw)
        check(h.name == f"t.{NAMES[d]}.{count}.{i}", h.name)
        handles[i] = h
        if j == 3:
            x = comm.allreduce(np.array([me + 1], np.int64))
            check(x[0] == n * (n + 1) // 2, f"blocking allreduce among async ones: {x}")
        elif j == 6:
            comm.barrier()
    x = comm.broadcast(np.array([77 if me == n - 1 else -1], np.int64), root=n - 1)
    check(x[0] == 77, f"blocking broadcast among async ones: {x}")
    for j in reversed(range(NT)):
        i = order[(j * 7 + me) % NT]
        h = handles.pop(i)
        if i % 2:
            while not h.test():
                time.sleep(0.0001)
            check(h.test(), "test() after done")
        got = h.wait()
        check(got is h.array and h.wait() is got, "wait returns the array, also when called again")
        same(f"allreduce_async {OPS[ops[i]]} {NAMES[d]} count {count + 3 * i}", got, wants[i])


def test_async_errors(comm):
    lib, inv = kolo.lib, kolo.ERR_INVALID_ARGUMENT
    v = np.zeros(8, np.float32)
    p = v.ctypes.data
    h = ctypes.c_void_p(8)

    def bad(rc, needle):
        msg = kolo.last_error()
        check(rc == inv, f"status {rc} ({msg}), want {inv}")
        check(needle in msg, f"message {msg!r} lacks {needle!r}")

    bad(lib.kolo_allreduce_async(None, b"x", p, 8, kolo.FLOAT32, kolo.SUM, ctypes.byref(h)), "comm is NULL")
    check(h.value is None, "*handle not set to NULL on failure")
    bad(lib.kolo_allreduce_async(comm._p, b"x", p, 8, kolo.FLOAT32, kolo.SUM, None), "handle is NULL")
    bad(lib.kolo_allreduce_async(comm._p, None, p, 8, kolo.FLOAT32, kolo.SUM, ctypes.byref(h)), "name is NULL")
    bad(lib.kolo_allreduce_async(comm._p, b"x", None, 8, kolo.FLOAT32, kolo.SUM, ctypes.byref(h)), "buf is NULL")
    bad(lib.kolo_allreduce_async(comm._p, b"x", p, 8, 0, kolo.SUM, ctypes.byref(h)), "unknown kolo_dtype 0")
    bad(lib.kolo_allreduce_async(comm._p, b"x", p, 8, kolo.FLOAT32, 0, ctypes.byref(h)), "unknown kolo_op 0")
    bad(lib.kolo_allreduce_async(comm._p, b"x", p + 2, 2, kolo.FLOAT32, kolo.SUM, ctypes.byref(h)), "not aligned")
    bad(lib.kolo_wait(None), "kolo_wait: handle is NULL")
    bad(lib.kolo_test(None, ctypes.byref(ctypes.c_int())), "kolo_test: handle is NULL")
    for call, exc, needle in [
        (lambda: comm.allreduce_async("kolo.mine", v), kolo.KoloError, "reserved"),
        (lambda: comm.allreduce_async("x", v, op=42), kolo.KoloError, "unknown kolo_op 42"),
        (lambda: comm.allreduce_async(b"x", v), TypeError, None),
        (lambda: comm.allreduce_async("a\0b", v), TypeError, None),
        (lambda: comm.allreduce_async("x", [1.0]), TypeError, None),
        (lambda: comm.allreduce_async("x", np.zeros((4, 4), np.float32)[:, 0]), ValueError, None),
    ]:
        try:
            call()
            check(False, f"no {exc.__name__}")
        except exc as e:
            check(needle is None or (e.status == inv and needle in e.message), f"{e}")
    # The first asynchronous call starts the engine (none of the above did): at the
    # same point on every rank, like a blocking call. Empty arrays are fine.
    e = comm.allreduce_async("empty", np.zeros(0, np.uint16), op=kolo.AVG, dtype=kolo.BFLOAT16)
    check(e.wait().size == 0, "empty")
    # A name already in flight on this rank: rank 0 submits "dup" twice before the
    # others submit it at all (after the barrier).
    one = np.ones(4, np.int32)
    if comm.rank == 0:
        h = comm.allreduce_async("dup", one)
        try:
            comm.allreduce_async("dup", np.ones(2, np.int32))
            check(False, "a name in flight twice was accepted")
        except kolo.KoloError as e:
            check(e.status == inv and "already in flight" in e.message, f"{e}")
        comm.barrier()
    else:
        comm.barrier()
        h = comm.allreduce_async("dup", one)
    # Dropping an unfinished handle waits for it: the array is never left to the engine.
    del h
    same("dropped handle", one, np.full(4, comm.size, np.int32))


def test_mismatch_engine(comm):
    """With the engine running, ranks that disagree fail that call only, all with
    ERR_MISMATCH, and the communicator keeps working."""
    try:
        comm.allreduce(np.zeros(9 if comm.rank == 1 else 8, np.float32))
        check(False, "mismatched blocking allreduce succeeded")
    except kolo.KoloError as e:
        check(e.status == kolo.ERR_MISMATCH and "shape" in e.message, f"{e}")
    comm.barrier()
    h = comm.allreduce_async("mm", np.zeros(8, np.float32 if comm.rank == 0 else np.int32))
    check(h.test() in (True, False), "test")
    for _ in range(2):  # the same error again
        try:
            h.wait()
            check(False, "mismatched async allreduce succeeded")
        except kolo.KoloError as e:
            check(e.status == kolo.ERR_MISMATCH and '"mm"' in e.message and "dtype" in e.message, f"{e}")
    x = comm.allreduce_async("mm", np.ones(1, np.float32)).wait()
    same("allreduce after the mismatch", x, np.full(1, comm.size, np.float32))
    comm.barrier()


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
    if sys.argv[1:] == ["--sync-mismatch"]:
        # Without the engine: every rank is told, and the communicator stays failed.
        with kolo.Comm() as comm:
            me = comm.rank
            test_mismatch(comm)
        if failures:
            sys.exit(1)
        print(f"test_kolo.py: passed (rank {me}, sync-mismatch)")
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
        test_async_errors(comm)  # starts the engine
        for d in DTYPES:
            for count in (1, 1000, 70001):
                test_async(comm, d, count, 100)
                test_async(comm, d, count, 200)
        test_collectives(comm, counts=[1, 1000])  # through the engine now
        test_errors(comm)
        test_mismatch_engine(comm)
    check(comm._p is None, "close")
    if failures:
        print(f"rank {me}: {len(failures)} checks failed", file=sys.stderr)
        sys.exit(1)
    print(f"test_kolo.py: passed (rank {me} of {n})")


if __name__ == "__main__":
    main()
