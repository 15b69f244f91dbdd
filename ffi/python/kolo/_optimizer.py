"""kolo.torch.DistributedOptimizer: Horovod's optimizer wrapper.

Each gradient is submitted to kolo's engine from a post-accumulate-grad hook
as soon as backward has produced it (after ``backward_passes_per_step``
accumulations), so communication overlaps the rest of backward; ``step()``
waits for the rest and then runs the wrapped optimizer's step.
"""

import warnings
from contextlib import contextmanager

import torch

from . import torch as hvd


class _DistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op, gradient_predivide_factor):
        super(self.__class__, self).__init__(params)
        self._compression = compression
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [(f"param.{i}.{j}", p) for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]
        if any(not isinstance(p, tuple) or len(p) != 2 for p in named_parameters):
            raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, usually model.named_parameters()")
        names = [n for n, _ in named_parameters]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"parameter names in named_parameters must be unique; repeated: {dups}")
        all_params = {id(p) for g in self.param_groups for p in g["params"]}
        named = {id(p) for _, p in named_parameters}
        missing = all_params - named
        if missing:
            raise ValueError(f"named_parameters was given, but {len(missing)} of the optimizer's parameters are not in it")
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError("DistributedOptimizer: op must be kolo.torch.Average or kolo.torch.Sum")
        if gradient_predivide_factor != 1.0 and op != hvd.Average:
            raise ValueError("gradient_predivide_factor needs op=Average")
        self._names = {p: n for n, p in named_parameters}
        self._op = op
        self._predivide = float(gradient_predivide_factor)
        self.backward_passes_per_step = int(backward_passes_per_step)
        if self.backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be at least 1")
        _check_same_model(named_parameters)
        self._delay = {}
        self._handles = {}
        self._hooks = []
        self._synchronized = False
        self._should_synchronize = True
        self._requires_update = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for p in self._requires_update:
            self._delay[p] = self.backward_passes_per_step
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    def _submit(self, p):
        if p.grad is None:
            # A parameter this rank's backward did not reach: its peers still
            # reduce it, so contribute zeros (as Horovod does).
            p.grad = torch.zeros_like(p)
        pre, post = 1.0, 1.0
        if self._predivide != 1.0:
            pre, post = 1.0 / self._predivide, self._predivide
        return hvd.allreduce_async_(
            p.grad,
            name=f"allreduce.{self._names[p]}",
            op=self._op,
            prescale_factor=pre,
            postscale_factor=post,
            compression=self._compression,
        )

    def _hook(self, p):
        if p in self._handles:
            raise AssertionError(
                f"gradient of {self._names[p]!r} was computed more than backward_passes_per_step="
                f"{self.backward_passes_per_step} times before step(); raise backward_passes_per_step "
                "to accumulate gradients locally"
            )
        self._delay[p] -= 1
        if self._delay[p] == 0:
            self._handles[p] = self._submit(p)

    def synchronize(self):
        """Wait until every gradient has been reduced (submitting those whose
        hook has not fired). Every rank raises if any reduction failed."""
        for p in self._requires_update:
            if p not in self._handles:
                self._handles[p] = self._submit(p)
        error = None
        for p, h in list(self._handles.items()):
            try:
                hvd.synchronize(h)
            except Exception as e:  # wait for every handle before raising
                error = error or e
        self._handles.clear()
        for p in self._requires_update:
            self._delay[p] = self.backward_passes_per_step
        self._synchronized = True
        if error is not None:
            raise error

    @contextmanager
    def skip_synchronize(self):
        """step() inside this block does not synchronize (call synchronize() first)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called after optimizer.synchronize() without skip_synchronize()")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none=True):
        if self._handles:
            raise AssertionError("optimizer.zero_grad() called while gradients are being reduced; call step() or synchronize() first")
        return super(self.__class__, self).zero_grad(set_to_none)


def _check_same_model(named_parameters):
    """Every rank must train the same parameters: one exchange of (name, shape,
    dtype) at construction turns a different model on some rank into the same
    ValueError on every rank, instead of tensors that no peer ever submits."""
    mine = [(n, tuple(p.shape), str(p.dtype)) for n, p in named_parameters if p.requires_grad]
    every = hvd.allgather_object(mine, name="DistributedOptimizer.parameters")
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            a, b = set(every[0]), set(theirs)
            diff = sorted(a ^ b)[:4]
            raise ValueError(
                f"DistributedOptimizer: rank {r}'s parameters differ from rank 0's "
                f"({len(theirs)} vs {len(every[0])}; first differences: {diff}); every rank must build the same model"
            )


def DistributedOptimizer(
    optimizer,
    named_parameters=None,
    compression=None,
    backward_passes_per_step=1,
    op=None,
    gradient_predivide_factor=1.0,
    num_groups=0,
    groups=None,
    sparse_as_dense=False,
    process_set=None,
):
    """Wrap `optimizer` so that gradients are averaged (or summed, ``op=Sum``)
    over all ranks before each step; returns an optimizer of the same class."""
    if num_groups or groups:
        raise NotImplementedError("DistributedOptimizer: num_groups/groups are not supported; kolo's engine fuses by itself")
    compression = hvd.Compression.none if compression is None else compression
    op = hvd.Average if op is None else op
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op, gradient_predivide_factor)
