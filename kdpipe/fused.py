"""Several runs of one architecture stepped as one: stacked weights, one vmapped forward and backward.

``train_pass`` hands a group of runs that share an architecture, optimizer settings and schedule
to ``FusedRuns``. Their weights, BatchNorm buffers and optimizer state are stacked along a new leading
dimension; ``torch.func.vmap`` over ``functional_call`` runs all of them on a batch at once
(convolutions become one grouped convolution, the first layer one wider convolution of the shared
input), their losses are computed together by one loss object whose hyperparameters are (S,) tensors
(kdpipe.losses: the same formula as a single run's), and one optimizer step updates every run. SGD,
Adam and AdamW are elementwise given the step count (which all runs of a group share), so a step on
the stack is the step of each run. The math per run is that of the
unfused loop, up to float rounding. At the end of every epoch the runs' own modules, optimizer
optimizer state and schedule position are brought up to date, so the rest of kdpipe never sees the stack.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from kdpipe.losses import main_labels
from kdpipe.util import rng_states, set_rng_states


# Optimizers whose update of each element depends only on that element's gradient and state (and
# the shared step count): one of them over stacked parameters steps every run exactly as its own would.
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


# Modules that draw random numbers in training mode (dropout masks, RReLU's slopes). Fused, the runs draw them
# together, as one tensor over the stack from one generator: no run gets the numbers it would draw unfused, and a
# run's masks would depend on which runs it was fused with. Such runs step one by one (why_not says so); randomness
# drawn elsewhere in a forward (F.dropout called in it) is caught on the group's first fused step (FusedRuns._first).
RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
RANDOM_DRAWS = ("draws random numbers in training ({}): fused, the runs would draw them together, and none would "
                "train to the weights it reaches unfused")


def random_modules(model: nn.Module) -> list[str]:
    """The types of the model's modules that draw random numbers as it trains now (dropout with p > 0)."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, RANDOM_MODULES) and m.training
                   and getattr(m, "p", 1) > 0})


def _stack_state(states: list[dict]) -> dict:
    """One fused parameter's optimizer state from the runs' states for it: tensors of the parameter's
    shape are stacked; scalars (Adam's step) are equal across runs (why_not checks) and kept once."""
    out = {}
    for key, v in states[0].items():
        if torch.is_tensor(v) and v.ndim > 0:
            out[key] = torch.stack([st[key] for st in states])
        else:
            out[key] = v.clone() if torch.is_tensor(v) else v
    return out


def fusion_key(run) -> tuple | None:
    """Runs with equal keys can be fused; None: this run cannot be fused with any other."""
    if run.optim is None or run.total_steps is None:
        return None
    if type(run.optimizer) not in ELEMENTWISE or not isinstance(run.scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    shapes = tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in run.model.named_parameters())
    bufs = tuple((n, tuple(b.shape), b.dtype) for n, b in run.model.named_buffers())
    return (type(run.model), run.arch, type(run.loss), repr(run.optim), run.total_steps,
            getattr(run, "warmup_steps", 0), run.model.training, shapes, bufs)


def plan_units(runs, fuse: bool, refused: list | None = None) -> list[list[int]]:
    """Indices of runs grouped into steps: groups of >= 2 fusable runs, the rest one by one (in order). `refused`
    gets (indices, why) for each group of alike runs that steps one by one all the same (FusedRuns.why_not)."""
    if not fuse:
        return [[i] for i in range(len(runs))]
    groups: dict = {}
    units: list[list[int]] = []
    for i, r in enumerate(runs):
        key = fusion_key(r)
        if key is None:
            units.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
            units.append(groups[key])
    out = []
    for u in units:  # a group that could not be fused as a whole steps its runs one by one
        why = FusedRuns.why_not([runs[i] for i in u]) if len(u) > 1 else None
        if why is not None:
            out += [[i] for i in u]
            if refused is not None:
                refused.append((u, why))
        else:
            out.append(u)
    # in the order of each unit's first run: runs that step one by one step in the order they step unfused (each
    # draws its random numbers from its own stream, engine.Run.rng, so the order does not change what it draws)
    return sorted(out, key=lambda u: u[0])


class _GlobalPoolAsMean(TorchFunctionMode):
    """adaptive_avg_pool2d to 1x1 is a mean over H and W; vmap has no batching rule for the pool's
    backward (it loops over the runs), but has one for mean."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.adaptive_avg_pool2d:
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            if size == 1 or size == (1, 1) or size == [1, 1]:
                return args[0].mean(dim=(-2, -1), keepdim=True)
        return func(*args, **kwargs)


class FusedRuns:
    def __init__(self, runs, amp: bool = False, compile: bool | str = False, pool_as_mean: bool = True, log=print):
        reason = self.why_not(runs)
        if reason:
            raise ValueError(f"cannot fuse these runs: {reason}")
        self.runs = runs
        first = runs[0]
        self.base = copy.deepcopy(first.model)
        self.names = [n for n, _ in first.model.named_parameters()]
        self.buffer_names = [n for n, _ in first.model.named_buffers()]
        models = [dict(r.model.named_parameters()) for r in runs]
        # a parameter the model froze (requires_grad=False: a user's pretrained backbone) stays frozen in the stack:
        # it gets no gradient, so the optimizer skips it (weight decay too), as it does in the run's own step
        self.params = {n: torch.stack([m[n].detach() for m in models]).requires_grad_(models[0][n].requires_grad)
                       for n in self.names}
        bufs = [dict(r.model.named_buffers()) for r in runs]
        self.buffers = {n: torch.stack([b[n].detach() for b in bufs]) for n in self.buffer_names}
        # One optimizer over the stacks, with the first run's groups and settings (all runs' are equal).
        name_of = {id(p): n for n, p in first.model.named_parameters()}
        groups = []
        for g in first.optimizer.param_groups:
            fg = {k: v for k, v in g.items() if k != "params"}
            fg["params"] = [self.params[name_of[id(p)]] for p in g["params"]]
            groups.append(fg)
        self.optimizer = type(first.optimizer)(groups)
        if first.optimizer.state:
            for g_fused, *g_runs in zip(self.optimizer.param_groups, *[r.optimizer.param_groups for r in runs]):
                for j, p in enumerate(g_fused["params"]):
                    if not p.requires_grad:  # frozen: no state, as in the runs' own optimizers
                        continue
                    self.optimizer.state[p] = _stack_state(
                        [r.optimizer.state[r_g["params"][j]] for r, r_g in zip(runs, g_runs)])
        self.lr_lambdas = list(first.scheduler.lr_lambdas)
        self.base_lrs = list(first.scheduler.base_lrs)
        self.step_count = first.scheduler.last_epoch
        dev = next(iter(self.params.values())).device
        self.loss = type(first.loss).stack([r.loss for r in runs], device=dev)
        self._epoch = None  # (epoch, the same as a 0-dim tensor on the device)
        self.stepped = False  # whether a step has changed the stack (until then, the runs' own modules are current)

        def forward(p, b, x):
            # One dict: functional_call writes back into it what the forward rebound (`self.count = self.count + 1`,
            # not in place), which it otherwise reverts when it puts the stack's tensors back; those are returned
            # (in-place updates, BatchNorm's, land in the stack's own tensors).
            state = {**p, **b}
            with _GlobalPoolAsMean() if pool_as_mean else nullcontext():
                out = functional_call(self.base, state, (x,))
            return out, {n: state[n] for n in b if state[n] is not b[n]}

        vforward = vmap(forward, in_dims=(0, 0, None), randomness="different")
        dev_type = dev.type

        def losses(p, b, x, t, y, epoch):
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
                out, rebound = vforward(p, b, x)  # (S, B, C); buffers the forward rebound, (S, ...) each
            correct = (out.detach().argmax(-1) == main_labels(y)).sum(-1)  # (S,) for the train top-1
            return self.loss(out, t, y, epoch), correct, rebound  # term -> (S,)

        self._eager = losses
        self._losses = losses
        self._check_compiled = bool(compile)
        self.log = log
        if compile:
            mode = compile if isinstance(compile, str) else None
            self._losses = torch.compile(losses, dynamic=False, mode=mode)

    @staticmethod
    def why_not(runs) -> str | None:
        """Why these runs cannot be fused, or None."""
        if len(runs) < 2:
            return "fewer than two runs"
        keys = {fusion_key(r) for r in runs}
        if None in keys or len(keys) != 1:
            return "the runs differ in architecture, optimizer settings, schedule or loss class"
        first = runs[0]
        ref = [{k: v for k, v in g.items() if k != "params"} for g in first.optimizer.param_groups]
        names = [[n for n, _ in r.model.named_parameters()] for r in runs]
        for r in runs:
            if [{k: v for k, v in g.items() if k != "params"} for g in r.optimizer.param_groups] != ref:
                return "the runs' optimizer groups differ"
            name_of = {id(p): n for n, p in r.model.named_parameters()}
            first_of = {id(p): n for n, p in first.model.named_parameters()}
            if [[name_of.get(id(p)) for p in g["params"]] for g in r.optimizer.param_groups] != \
                    [[first_of.get(id(p)) for p in g["params"]] for g in first.optimizer.param_groups]:
                return "the runs group their parameters differently"
            if r.scheduler.last_epoch != first.scheduler.last_epoch:
                return "the runs are at different points of their schedules"
            if r.scheduler.base_lrs != first.scheduler.base_lrs:
                return "the runs' base learning rates differ"
            has = [bool(r.optimizer.state.get(p)) for g in r.optimizer.param_groups for p in g["params"]
                   if p.requires_grad]  # a frozen one never gets state
            if any(has) and not all(has):
                return "a run holds optimizer state for some parameters only"
            steps = {float(st["step"]) for st in r.optimizer.state.values() if "step" in st}
            first_steps = {float(st["step"]) for st in first.optimizer.state.values() if "step" in st}
            if steps != first_steps:
                return "the runs' optimizers are at different step counts"
        if len({bool(r.optimizer.state) for r in runs}) != 1:
            return "some runs hold optimizer state, others not"
        if any(n != names[0] for n in names):
            return "the runs name their parameters differently"
        drawn = random_modules(first.model)
        if drawn:
            return "their network " + RANDOM_DRAWS.format(", ".join(drawn))
        return None

    def step(self, x: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor, epoch: int = 0) -> tuple[dict, torch.Tensor]:
        """One training step of every run on the batch; returns their loss terms (detached, each (S,)) and
        how many samples of the batch each run classified right ((S,))."""
        if self._epoch is None or self._epoch[0] != epoch:  # a tensor: compiled code is not specialised on it
            self._epoch = (epoch, torch.tensor(float(epoch), device=x.device))
        args = (self.params, self.buffers, x, t, y, self._epoch[1])
        if self.stepped:
            terms, correct, rebound = self._losses(*args)
        else:
            terms, correct, rebound = self._first(args, x.device)
        for n, v in rebound.items():  # contiguous: one the forward set to a constant comes back expanded over the runs
            self.buffers[n] = v.detach().contiguous()
        self.optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).sum().backward()
        self.optimizer.step()
        self.stepped = True
        self.step_count += 1
        for g, base, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            g["lr"] = base * fn(self.step_count)
        return {n: v.detach() for n, v in terms.items()}, correct

    def _first(self, args, device):
        """The group's first forward and losses: compiled where asked (where compiling fails, uncompiled, saying so),
        refused where it drew random numbers. Where it raises, the random generators are as before it, so that runs
        that then step one by one draw what they would have drawn unfused."""
        rng = rng_states(device)
        try:
            if self._check_compiled:  # the first call compiles; where that fails, step uncompiled
                self._check_compiled = False
                try:
                    got = self._losses(*args)
                except Exception as e:  # torch.compile raises many types (missing compiler, unsupported op)
                    self.log(f"warning: torch.compile of the fused runs failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); stepping them uncompiled")
                    self._losses = self._eager
                    set_rng_states(device, rng)
                    got = self._losses(*args)
            else:
                got = self._losses(*args)
            if any(not torch.equal(a, b) for a, b in zip(rng, rng_states(device))):
                raise RuntimeError("their forward " + RANDOM_DRAWS.format("dropout or other randomness"))
        except BaseException:
            set_rng_states(device, rng)
            raise
        return got

    @torch.no_grad()
    def sync_to_runs(self) -> None:
        """Copy weights, buffers, optimizer state and schedule position back into each run's own objects."""
        for s, r in enumerate(self.runs):
            params = dict(r.model.named_parameters())
            for n in self.names:
                params[n].copy_(self.params[n][s])
            bufs = dict(r.model.named_buffers())
            for n in self.buffer_names:
                v = self.buffers[n][s]
                if bufs[n].shape == v.shape and bufs[n].dtype == v.dtype:
                    bufs[n].copy_(v)
                else:  # the forward rebound it to another shape or dtype, as it does to the run's own module unfused
                    owner, _, leaf = n.rpartition(".")
                    setattr(r.model.get_submodule(owner), leaf, v.clone())
            for g_fused, g_run in zip(self.optimizer.param_groups, r.optimizer.param_groups):
                for pf, pr in zip(g_fused["params"], g_run["params"]):
                    for key, v in self.optimizer.state.get(pf, {}).items():
                        if torch.is_tensor(v) and v.ndim > 0:
                            r.optimizer.state[pr][key] = v[s].clone()
                        elif v is not None:
                            r.optimizer.state[pr][key] = v.clone() if torch.is_tensor(v) else v
            r.scheduler.last_epoch = self.step_count
            for g, base, fn in zip(r.optimizer.param_groups, r.scheduler.base_lrs, r.scheduler.lr_lambdas):
                g["lr"] = base * fn(self.step_count)
            r.scheduler._last_lr = [g["lr"] for g in r.optimizer.param_groups]

