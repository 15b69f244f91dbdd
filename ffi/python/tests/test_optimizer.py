"""DistributedOptimizer, broadcast_parameters and broadcast_optimizer_state:
training on shards equals one process on the whole batch (float64, within
1e-10) and leaves bitwise-equal parameters on every rank."""

import pytest
import torch

import kolo
import kolo.torch as hvd

STEPS, MICRO = 5, 3  # steps, and samples per rank per backward pass


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()


def data(step, total):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(total, 6, generator=g, dtype=torch.float64), torch.randn(total, 2, generator=g, dtype=torch.float64)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def train_serial(n, bpps):
    """One process, the whole batch of every step at once."""
    m = model(0)
    opt = sgd(m.parameters())
    total = n * bpps * MICRO
    for step in range(STEPS):
        x, y = data(step, total)
        opt.zero_grad()
        (((m(x) - y) ** 2).sum() / total).backward()
        opt.step()
    return flat(m)


def train_distributed(n, me, bpps, seed, opt_factory=sgd, **kw):
    m = model(seed)
    opt = hvd.DistributedOptimizer(opt_factory(m.parameters()), named_parameters=m.named_parameters(), backward_passes_per_step=bpps, **kw)
    hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    total = n * bpps * MICRO
    for step in range(STEPS):
        x, y = data(step, total)
        opt.zero_grad()
        for k in range(bpps):
            lo = (me * bpps + k) * MICRO
            xs, ys = x[lo : lo + MICRO], y[lo : lo + MICRO]
            # Scaled so that the average over ranks of the accumulated
            # gradients is the gradient of the whole batch's mean loss.
            (((m(xs) - ys) ** 2).sum() * n / total).backward()
        opt.step()
    return flat(m)


def assert_same_on_every_rank(v, n):
    every = hvd.allgather(v.unsqueeze(0), name="check.params")
    for r in range(n):
        assert torch.equal(every[r], every[0]), f"rank {r}'s parameters differ from rank 0's"


@pytest.mark.parametrize("bpps", [1, 2])
@pytest.mark.parametrize("same_init", [True, False], ids=["same-init", "different-init"])
def test_training_equals_one_process_on_the_whole_batch(bpps, same_init, n, me):
    ref = train_serial(n, bpps)
    got = train_distributed(n, me, bpps, seed=0 if same_init or me == 0 else 100 + me)
    err = float((got - ref).abs().max())
    assert err <= 1e-10, f"max difference from one process: {err}"
    assert_same_on_every_rank(got, n)


def test_predivide_factor_and_sum_op(n, me):
    ref = train_serial(n, 1)
    got = train_distributed(n, me, 1, seed=0, gradient_predivide_factor=4.0)
    assert float((got - ref).abs().max()) <= 1e-10
    assert_same_on_every_rank(got, n)
    # op=Sum: gradients summed, so a loss divided by n again matches.
    m = model(0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(), op=hvd.Sum)
    x, y = data(0, n * MICRO)
    xs, ys = x[me * MICRO : (me + 1) * MICRO], y[me * MICRO : (me + 1) * MICRO]
    (((m(xs) - ys) ** 2).sum() / (n * MICRO)).backward()
    opt.step()
    s = model(0)
    ((s(x) - y) ** 2).sum().div(n * MICRO).backward()
    torch.optim.SGD(s.parameters(), lr=0.1).step()
    assert float((flat(m) - flat(s)).abs().max()) <= 1e-10


def test_broadcast_optimizer_state_includes_momentum_and_hyperparameters(n, me):
    m = model(7)
    opt = torch.optim.SGD(m.parameters(), lr=0.1 * (me + 1), momentum=0.5)
    x, y = data(me, 4)  # every rank steps on its own data: momentum buffers differ
    ((m(x) - y) ** 2).sum().backward()
    opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    bufs = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in m.parameters()])
    assert_same_on_every_rank(bufs, n)
    hvd.broadcast_parameters(dict(m.named_parameters()), root_rank=0)
    assert_same_on_every_rank(flat(m), n)


def test_adam_with_gradients_missing_on_some_ranks(n, me):
    """A parameter that one rank's backward does not reach is still reduced (zeros)."""
    m = model(0)
    opt = hvd.DistributedOptimizer(torch.optim.Adam(m.parameters(), lr=1e-3), named_parameters=m.named_parameters())
    x, y = data(3, 2)
    out = m(x) if me % 2 == 0 else m[0](x).sum() * 0 + y.sum()
    ((out - y) ** 2).sum().backward()
    opt.step()
    assert_same_on_every_rank(flat(m), n)


@pytest.mark.parametrize("how", ["shapes", "layers"])
def test_different_models_fail_on_every_rank(how, n, me):
    if n == 1:
        pytest.skip("needs two ranks")
    if how == "shapes":
        m = torch.nn.Linear(4, 3 + me).double()  # same names, different shapes
    else:
        m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(1 + me % 2)])  # extra layer
    with pytest.raises(ValueError, match="rank 1's parameters differ from rank 0's"):
        hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters())
    # Below the optimizer, the engine finds the same disagreement on every rank.
    with pytest.raises(kolo.KoloError, match="mismatch"):
        hvd.allreduce(torch.ones(3 + me), name="mismatched.shapes")
    assert torch.equal(hvd.allreduce(torch.ones(2), op=hvd.Sum, name="after.mismatch"), torch.full((2,), float(n)))


def test_backward_more_often_than_declared_is_an_error(n, me):
    m = model(0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters())
    x, y = data(0, 2)
    ((m(x) - y) ** 2).sum().backward()
    with pytest.raises(AssertionError, match="backward_passes_per_step"):
        ((m(x) - y) ** 2).sum().backward()
    opt.synchronize()
    with opt.skip_synchronize():
        opt.step()


def test_join_with_uneven_batches_in_training(n, me):
    """Rank r has r + 1 batches, then joins: each step averages the gradients
    of the ranks that still have a batch, as computed serially here."""
    def loss(m, r, i):
        x, y = data(100 + 10 * r + i, MICRO)
        return ((m(x) - y) ** 2).sum()

    ref = model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for i in range(n):
        ref_opt.zero_grad()
        grads = []
        for r in range(i, n):  # ranks with more than i batches
            ref.zero_grad()
            loss(ref, r, i).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for j, p in enumerate(ref.parameters()):
            p.grad = sum(g[j] for g in grads) / len(grads)
        ref_opt.step()

    m = model(0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), named_parameters=m.named_parameters())
    for i in range(me + 1):
        opt.zero_grad()
        loss(m, me, i).backward()
        opt.step()
    last = hvd.join()
    assert last == n - 1
    # Rank n-1 ran every step; the others stopped early, as a joined rank does.
    if me == n - 1:
        assert float((flat(m) - flat(ref)).abs().max()) <= 1e-10


def test_gradients_are_submitted_during_backward(n, me):
    m = model(0)
    seen = []
    params = list(m.parameters())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1), named_parameters=m.named_parameters(), backward_passes_per_step=2)
    # When the first layer's gradient is computed (last in backward), the
    # later layers' gradients must already be on their way.
    params[0].register_hook(lambda g: seen.append(len(opt._handles)))
    x, y = data(0, 2)
    ((m(x) - y) ** 2).sum().backward()
    assert seen == [0] and not opt._handles, "submitted before backward_passes_per_step passes"
    ((m(x) - y) ** 2).sum().backward()
    assert seen[1] >= len(params) - 2, f"only {seen[1]} gradients were submitted during backward"
    assert len(opt._handles) == len(params)
    opt.step()
