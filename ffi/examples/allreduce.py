"""Average a vector across ranks with kolo's Python module (ctypes + numpy).

    target/release/kolorun -np 3 .venv/bin/python ffi/examples/allreduce.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # ffi/python
import kolo  # noqa: E402

with kolo.Comm() as comm:  # rank, size and rendezvous from kolorun
    grad = np.array([1, 1, 2, 3], np.float32) * comm.rank
    comm.allreduce(grad, op=kolo.AVG)  # in place
    ranks = comm.allgather(np.array([comm.rank], np.int32))
    print(f"rank {comm.rank} of {comm.size}: mean {grad}, ranks {ranks}")
