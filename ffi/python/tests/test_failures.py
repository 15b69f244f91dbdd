"""A rank that raises in the middle of a step: its peers fail with a clear
error within KOLO_TIMEOUT instead of hanging. This test starts its own two
ranks (with kolo's environment, no launcher, so that no launcher stops the
peers first) and runs once, in the -np 1 session."""

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import kolo.torch as hvd

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import kolo, kolo.torch as hvd
    hvd.init()
    me = hvd.rank()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).double()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters())

    def boom(grad):  # the first layer's gradient comes last: the others are already sent
        raise RuntimeError("rank 1 raises mid-step")

    for step in range(3):
        opt.zero_grad()
        if step == 1 and me == 1:
            m[0].weight.register_hook(boom)
        t0 = time.monotonic()
        try:
            m(torch.ones(2, 8, dtype=torch.float64)).sum().backward()
            opt.step()
        except kolo.KoloError as e:
            print(f"rank {me}: step {step} failed after {time.monotonic() - t0:.1f} s: {e}", flush=True)
            sys.exit(3)
        print(f"rank {me}: step {step} done", flush=True)
    """
)

TIMEOUT = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_raising_mid_step_makes_its_peers_fail(tmp_path):
    if hvd.size() != 1:
        pytest.skip("starts its own ranks; runs in the one-rank session")
    script = tmp_path / "raise_mid_step.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOLO_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(KOLO_SIZE="2", KOLO_MASTER_ADDR="127.0.0.1", KOLO_MASTER_PORT=str(free_port()), KOLO_TIMEOUT=str(TIMEOUT), KOLO_SECRET=secrets.token_hex(16))
    procs = [
        subprocess.Popen([sys.executable, str(script)], env={**env, "KOLO_RANK": str(r), "KOLO_LOCAL_RANK": str(r), "KOLO_LOCAL_SIZE": "2"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    t0 = time.monotonic()
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - t0
    assert "rank 1 raises mid-step" in outs[1] and procs[1].returncode != 0, outs[1]
    assert procs[0].returncode == 3, f"rank 0 did not fail with a KoloError:\n{outs[0]}"
    line = next(ln for ln in outs[0].splitlines() if "failed after" in ln)
    waited = float(line.split("failed after ")[1].split(" s")[0])
    assert "step 1" in line and waited <= TIMEOUT + 2, line
    assert "rank" in line.split(": ", 2)[2] and ("peer" in line or "rank 1" in line), f"the error names neither rank nor peer: {line}"
    assert elapsed < 30
