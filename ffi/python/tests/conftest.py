"""Tests of kolo.torch, run on every rank under the launcher:

    kolorun -np 4 python -m pytest -q -p no:cacheprovider ffi/python/tests

Every rank runs the same tests in the same order, so their collectives match.
References are computed here, serially, from every rank's inputs (each rank
can generate all of them from the seeds). test_failures.py starts its own
ranks and runs once, under -np 1.
"""

import pytest
import torch

import kolo.torch as hvd


@pytest.fixture(scope="session", autouse=True)
def kolo_session():
    hvd.init()
    yield
    hvd.shutdown()


@pytest.fixture
def n():
    return hvd.size()


@pytest.fixture
def me():
    return hvd.rank()


def gen(rank, shape, dtype, seed, kind="small"):
    """Rank `rank`'s input: small integers (exact in every dtype, whatever the
    order of the sums), or ones of magnitude 1-2 for products."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    if kind == "prod":
        v = torch.randint(1, 3, shape, generator=g) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)
    else:
        v = torch.randint(-20, 21, shape, generator=g)
    if dtype == torch.uint8:
        v = v.abs()
    return v.to(dtype)
