"""kolo from Python: collectives over TCP on numpy arrays, through libkolo's C API (ctypes).

``pip install ./ffi/python`` bundles libkolo.so and the ``kolorun`` launcher in the
package (``kolo._lib`` loads it; $KOLO_LIB overrides). Run under the launcher::

    kolorun -np 3 python3 my_script.py

    import numpy as np, kolo
    with kolo.Comm() as comm:                       # rank, size, rendezvous from the launcher
        grad = np.full(1024, comm.rank, np.float32)
        comm.allreduce(grad, op=kolo.AVG)           # in place
        everyone = comm.allgather(np.array([comm.rank], np.int32))
        h = comm.allreduce_async("layer1.grad", grad, op=kolo.AVG)  # named, returns at once
        ...                                                          # other work
        h.wait()                                                     # grad holds the average

Arrays must be C-contiguous (outputs writeable); numpy dtypes uint8, int32, int64,
float16, float32 and float64 map to kolo's. numpy has no bfloat16: pass uint16 arrays
holding bfloat16 bits with ``dtype=kolo.BFLOAT16`` (``to_bfloat16`` / ``from_bfloat16``
convert). Failures raise ``KoloError`` with the C status and kolo's full message.
Array shapes are checked here before calling C (which trusts the counts); a rank that
raises ``ValueError`` sends nothing, so its peers time out (KOLO_TIMEOUT) rather than
hear about it at once.

``allreduce_async`` (kolo_allreduce_async) starts the engine on its first call, like
the C API: ranks may then submit named tensors in any order, and the blocking methods
run through the engine too. Its ``Handle`` keeps the array alive until the operation
has finished (dropping an unfinished handle waits for it).
"""

import ctypes

import numpy as np

from ._lib import comm_p as _comm_p
from ._lib import handle_p as _handle_p
from ._lib import lib

# kolo_dtype (the values of kolo.h)
UINT8, INT32, INT64, FLOAT16, BFLOAT16, FLOAT32, FLOAT64 = 1, 2, 3, 4, 5, 6, 7
# kolo_op
SUM, PROD, MIN, MAX, AVG = 1, 2, 3, 4, 5
# status codes
OK = 0
ERR_INVALID_ARGUMENT = -1
ERR_MISMATCH = -2
ERR_PEER_LOST = -3
ERR_TIMEOUT = -4
ERR_INTERNAL = -5
ERR_ABORTED = -6
ERR_PROTOCOL = -7
ERR_CONFIG = -8
ERR_RENDEZVOUS = -9
ERR_IO = -10

_ITEMSIZE = {UINT8: 1, INT32: 4, INT64: 8, FLOAT16: 2, BFLOAT16: 2, FLOAT32: 4, FLOAT64: 8}
_FROM_NUMPY = {
    np.dtype(np.uint8): UINT8,
    np.dtype(np.int32): INT32,
    np.dtype(np.int64): INT64,
    np.dtype(np.float16): FLOAT16,
    np.dtype(np.float32): FLOAT32,
    np.dtype(np.float64): FLOAT64,
}

class KoloError(RuntimeError):
    """A failed kolo call: ``status`` is the C status code, ``message`` kolo's text."""

    def __init__(self, status, message):
        super().__init__(f"{status_string(status)} ({status}): {message}")
        self.status = status
        self.message = message


def last_error():
    """The message of the last failed kolo call on this thread ('' if none)."""
    return lib.kolo_last_error().decode()


def status_string(status):
    """The description of a status code."""
    return lib.kolo_status_string(status).decode()


def version():
    """The library's version as (major, minor, patch)."""
    v = [ctypes.c_int() for _ in range(3)]
    _check(lib.kolo_version(*[ctypes.byref(x) for x in v]))
    return tuple(x.value for x in v)


def _check(rc):
    if rc != OK:
        raise KoloError(rc, last_error())


def to_bfloat16(a):
    """float32 values -> uint16 array of bfloat16 bits (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)


def from_bfloat16(b):
    """uint16 array of bfloat16 bits -> float32 values (exact)."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _kind(a, dtype):
    """The kolo dtype of array `a` (or the given one, checked against its itemsize)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(a).__name__}")
    if dtype is None:
        try:
            return _FROM_NUMPY[a.dtype]
        except KeyError:
            raise TypeError(
                f"numpy dtype {a.dtype} has no kolo dtype (for bfloat16 pass uint16 bits and dtype=kolo.BFLOAT16)"
            ) from None
    if _ITEMSIZE.get(dtype) != a.dtype.itemsize:
        raise TypeError(f"kolo dtype {dtype} does not fit numpy {a.dtype}")
    return dtype


def _like(recv, send, count):
    """`recv` must be a numpy array of send's dtype with `count` elements."""
    if not isinstance(recv, np.ndarray) or recv.dtype != send.dtype:
        raise TypeError(f"recv must be a numpy array of {send.dtype}")
    if recv.size != count:
        raise ValueError(f"recv has {recv.size} elements, need {count}")


def _ptr(a, what, out=False):
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if out and not a.flags.writeable:
        raise ValueError(f"{what} must be writeable")
    return a.ctypes.data


class Handle:
    """An asynchronous operation (kolo_handle) from ``Comm.allreduce_async``. It holds
    the array until the operation has finished, since the engine writes into it."""

    def __init__(self, p, array, name):
        self._p, self._error = p, None
        self.array, self.name = array, name

    def test(self):
        """True once the operation has finished (successfully or not); never blocks.
        ``wait()`` then returns at once with its result."""
        if self._p is None:
            return True
        done = ctypes.c_int()
        _check(lib.kolo_test(self._p, ctypes.byref(done)))
        return bool(done.value)

    def wait(self):
        """Block until the operation has finished and return the array (reduced in
        place), or raise its ``KoloError``. Frees the C handle; calling it again
        returns the same array or raises the same error."""
        if self._p is not None:
            p, self._p = self._p, None
            rc = lib.kolo_wait(p)
            if rc != OK:
                self._error = KoloError(rc, last_error())
        if self._error is not None:
            raise self._error
        return self.array

    def __del__(self):
        # Never let the array go while the engine may still write into it.
        if getattr(self, "_p", None) is not None:
            lib.kolo_wait(self._p)
            self._p = None


class Comm:
    """A communicator (kolo_comm) joined from the environment; use as a context manager
    or call close(). Methods return the output array."""

    def __init__(self):
        p = _comm_p()
        _check(lib.kolo_init_from_env(ctypes.byref(p)))
        self._p = p

    def _get(self, f):
        x = ctypes.c_int()
        _check(f(self._handle(), ctypes.byref(x)))
        return x.value

    def _handle(self):
        if self._p is None:
            raise ValueError("communicator is closed")
        return self._p

    @property
    def rank(self):
        return self._get(lib.kolo_comm_rank)

    @property
    def size(self):
        return self._get(lib.kolo_comm_size)

    @property
    def local_rank(self):
        return self._get(lib.kolo_comm_local_rank)

    @property
    def local_size(self):
        return self._get(lib.kolo_comm_local_size)

    def allreduce(self, send, recv=None, op=SUM, dtype=None):
        """Reduce `send` across ranks into `recv` (default: in place into `send`)."""
        d = _kind(send, dtype)
        if recv is None:
            recv = send
        else:
            _like(recv, send, send.size)
        _check(lib.kolo_allreduce(self._handle(), _ptr(send, "send"), _ptr(recv, "recv", True), send.size, d, op))
        return recv

    def broadcast(self, buf, root=0, dtype=None):
        """Copy rank `root`'s `buf` into `buf` on every rank."""
        d = _kind(buf, dtype)
        _check(lib.kolo_broadcast(self._handle(), _ptr(buf, "buf", True), buf.size, d, root))
        return buf

    def allgather(self, send, recv=None, dtype=None):
        """Every rank's `send`, in rank order, in `recv` (size * send.size elements; allocated if None)."""
        d = _kind(send, dtype)
        n = self.size
        if recv is None:
            recv = np.empty(n * send.size, send.dtype)
        else:
            _like(recv, send, n * send.size)
        _check(lib.kolo_allgather(self._handle(), _ptr(send, "send"), _ptr(recv, "recv", True), send.size, d))
        return recv

    def reduce_scatter(self, send, recv=None, op=SUM, dtype=None):
        """Reduce `send` (size * k elements) across ranks; `recv` (k elements) gets this rank's block."""
        d = _kind(send, dtype)
        n = self.size
        if send.size % n:
            raise ValueError(f"send has {send.size} elements, not a multiple of size {n}")
        if recv is None:
            recv = np.empty(send.size // n, send.dtype)
        else:
            _like(recv, send, send.size // n)
        _check(
            lib.kolo_reduce_scatter(self._handle(), _ptr(send, "send"), _ptr(recv, "recv", True), recv.size, d, op)
        )
        return recv

    def alltoall(self, send, recv=None, dtype=None):
        """Block j of `send` goes to rank j; block i of `recv` comes from rank i."""
        d = _kind(send, dtype)
        n = self.size
        if send.size % n:
            raise ValueError(f"send has {send.size} elements, not a multiple of size {n}")
        if recv is None:
            recv = np.empty_like(send)
        else:
            _like(recv, send, send.size)
        _check(lib.kolo_alltoall(self._handle(), _ptr(send, "send"), _ptr(recv, "recv", True), send.size // n, d))
        return recv

    def allreduce_async(self, name, array, op=SUM, dtype=None):
        """Start an in-place allreduce of `array` under `name` (unique among this rank's
        operations in flight, the same on every rank; "kolo." names are reserved) and
        return its ``Handle``. Do not touch `array` until ``wait()``."""
        d = _kind(array, dtype)
        if not isinstance(name, str) or "\0" in name:
            raise TypeError("name must be a str without NUL characters")
        h = _handle_p()
        ptr = _ptr(array, "array", True)
        _check(lib.kolo_allreduce_async(self._handle(), name.encode(), ptr, array.size, d, op, ctypes.byref(h)))
        return Handle(h, array, name)

    def barrier(self):
        """Return once every rank has entered the barrier."""
        _check(lib.kolo_barrier(self._handle()))

    def close(self):
        """Close the connections (kolo_comm_destroy). Idempotent."""
        if self._p is not None:
            p, self._p = self._p, None
            _check(lib.kolo_comm_destroy(p))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_p", None) is not None:
            lib.kolo_comm_destroy(self._p)
            self._p = None
