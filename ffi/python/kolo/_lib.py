"""Loading libkolo.so and declaring the C prototypes of kolo.h for ctypes.

The wheel bundles the library next to this file (setuptools-rust names it
``libkolo<python suffix>.so``), so an installed package needs no environment
variable. $KOLO_LIB overrides it; in a source checkout without a build in the
package, the repository's target/release/libkolo.so is used.

ctypes.CDLL (not PyDLL) releases the GIL for the duration of every foreign
call, so Python threads keep running while one waits in a collective.
"""

import ctypes
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def find_library():
    """The path of the libkolo.so to load (see the module's doc)."""
    env = os.environ.get("KOLO_LIB")
    if env:
        return env
    bundled = sorted(_HERE.glob("libkolo*.so"))
    if bundled:
        return str(bundled[0])
    return str(_HERE.parents[2] / "target" / "release" / "libkolo.so")


lib = ctypes.CDLL(find_library())
"""The C library (ctypes.CDLL: the GIL is released during each call)."""

c_int_p = ctypes.POINTER(ctypes.c_int)
comm_p = ctypes.c_void_p
handle_p = ctypes.c_void_p
_i, _sz, _vp, _cp = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
_hpp = ctypes.POINTER(handle_p)

PROTOTYPES = [
    ("kolo_init_from_env", [ctypes.POINTER(comm_p)], _i),
    ("kolo_comm_destroy", [comm_p], _i),
    ("kolo_comm_rank", [comm_p, c_int_p], _i),
    ("kolo_comm_size", [comm_p, c_int_p], _i),
    ("kolo_comm_local_rank", [comm_p, c_int_p], _i),
    ("kolo_comm_local_size", [comm_p, c_int_p], _i),
    ("kolo_allreduce", [comm_p, _vp, _vp, _sz, _i, _i], _i),
    ("kolo_broadcast", [comm_p, _vp, _sz, _i, _i], _i),
    ("kolo_allgather", [comm_p, _vp, _vp, _sz, _i], _i),
    ("kolo_reduce_scatter", [comm_p, _vp, _vp, _sz, _i, _i], _i),
    ("kolo_alltoall", [comm_p, _vp, _vp, _sz, _i], _i),
    ("kolo_barrier", [comm_p], _i),
    ("kolo_allreduce_async", [comm_p, _cp, _vp, _sz, _i, _i, _hpp], _i),
    ("kolo_allreduce_async_compressed", [comm_p, _cp, _vp, _sz, _i, _i, _cp, _hpp], _i),
    ("kolo_allgather_async", [comm_p, _cp, _vp, _sz, _vp, _sz, _i, _hpp], _i),
    ("kolo_broadcast_async", [comm_p, _cp, _vp, _sz, _i, _i, _hpp], _i),
    ("kolo_reduce_scatter_async", [comm_p, _cp, _vp, _vp, _sz, _i, _i, _hpp], _i),
    ("kolo_alltoall_async", [comm_p, _cp, _vp, _vp, _sz, _i, _hpp], _i),
    (
        "kolo_grouped_allreduce_async",
        [comm_p, _cp, _sz, ctypes.POINTER(_cp), ctypes.POINTER(_vp), ctypes.POINTER(_sz), c_int_p, _i, _hpp],
        _i,
    ),
    ("kolo_join", [comm_p, c_int_p], _i),
    ("kolo_wait", [handle_p], _i),
    ("kolo_test", [handle_p, c_int_p], _i),
    ("kolo_last_error", [], _cp),
    ("kolo_status_string", [_i], _cp),
    ("kolo_version", [c_int_p, c_int_p, c_int_p], _i),
]

for _name, _args, _res in PROTOTYPES:
    _f = getattr(lib, _name)
    _f.argtypes, _f.restype = _args, _res
