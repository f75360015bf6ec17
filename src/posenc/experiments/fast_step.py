"""The training step of a run: forward, loss, backward, gradient clipping, AdamW.

Two implementations of the same arithmetic, chosen by ``step_mode``:

* ``reference``: eager autograd through the (DDP-wrapped) model and the default
  ``torch.optim.AdamW``: the step of every committed record without a ``train_step`` field.
* ``fast``: the whole forward + loss + backward of one batch shape traced once into a
  single graph of aten ops (``make_fx`` on real tensors) and compiled with Inductor;
  then ``clip_grad_norm_(foreach=True)`` and ``AdamW(fused=True)``. At the study's sizes
  (width 64, 2 layers, batches of 64 x 17 or 32 x 64 tokens) an eager step is mostly
  per-op overhead: ~600 small kernels and their Python dispatch. Tracing on real
  tensors runs the model's Python once, so everything that depends only on the
  positions (RoPE's exact float64 cos/sin tables, ALiBi's and T5's ``[h, s, s]``
  biases, the causal mask, the encodings' input checks) is evaluated at trace time
  and folded into constants; attention is traced through SDPA's math backend
  (matmul + softmax at these lengths) so Inductor fuses it with its neighbours.

What makes the trace valid: positions are the same ``arange(s)`` every step (they are
constants of the graph and checked equal at every call), token ids are not read by any
Python branch (the model is called with ``check_tokens=False``; the task builds ids in
range) and the graph is specialized to one batch shape. Synthetic batches, whose width
is the longest example drawn, are right-padded to the longest training sequence
(padding tokens are masked out of the loss and, behind a causal mask, change no real
token's output), so one graph serves the whole run. Runs with randomized positions or a
length-dependent encoding draw positions per batch and take the reference step.

Tolerance: the compiled graph sums in another float32 order than eager kernels, and
fused AdamW rounds differently from the single-tensor loop: over 20 steps the losses of
the two steps agree to ``rtol=1e-4`` (``tests/test_fast_step.py``; observed <= 4.1e-7).
Results are deterministic for a given thread count either way.

``step_mode`` ``"auto"`` (the default) takes the fast step when it can and the run is
long enough to pay for compiling (``AUTO_MIN_STEPS``); the environment variable
``POSENC_TRAIN_STEP`` (``fast``, ``reference`` or ``auto``) overrides it for every run
of a process (``posenc train``, ``study`` and ``extend`` included).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from posenc.data.synthetic import PAD
from posenc.experiments.distributed import SINGLE_PROCESS, DistContext

STEP_MODES = ("auto", "fast", "reference")
ENV_STEP = "POSENC_TRAIN_STEP"
#: ``auto`` compiles only runs of at least this many steps (compiling takes 10-60 s on 2 cores).
AUTO_MIN_STEPS = 500
Step = Callable[..., torch.Tensor]  # (inputs, targets, mask, positions, count, what) -> the global mean loss


def resolve_mode(requested: str | None, *, steps: int, varying_positions: bool) -> str:
    """``fast`` or ``reference`` for a run: ``requested`` (else ``$POSENC_TRAIN_STEP``,
    else ``auto``); ``auto`` and ``fast`` fall back to ``reference`` when positions vary
    per batch, ``auto`` also for runs shorter than ``AUTO_MIN_STEPS``."""
    mode = requested if requested is not None else os.environ.get(ENV_STEP, "auto") or "auto"
    if mode not in STEP_MODES:
        raise ValueError(f"step mode must be one of {list(STEP_MODES)} (from {ENV_STEP} or step_mode), got {mode!r}")
    if mode == "reference" or varying_positions:
        return "reference"
    if mode == "auto" and steps < AUTO_MIN_STEPS:
        return "reference"
    return "fast"


def make_optimizer(model: nn.Module, mode: str, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the run's betas; fused (one kernel for every parameter) for the fast step."""
    extra = {"fused": True} if mode == "fast" else {}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), **extra)


def set_implementation(opt: torch.optim.Optimizer, mode: str) -> None:
    """After ``load_state_dict``: the implementation flags of ``mode`` (a checkpoint of the
    other step stores its own; the state tensors are the same)."""
    for group in opt.param_groups:
        group["fused"] = True if mode == "fast" else None
        group["foreach"] = None


def masked_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, count: float | torch.Tensor
) -> torch.Tensor:
    """Summed token cross-entropy of ``logits [b, s, V]`` (over ``mask [b, s]`` when given),
    divided by ``count``, the number of scored tokens in the global batch."""
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (token_loss.sum() if mask is None else (token_loss * mask.reshape(-1)).sum()) / count


class ReferenceStep:
    """The eager step; DDP (``wrapped``) averages gradients over ranks."""

    def __init__(
        self,
        model: nn.Module,
        wrapped: nn.Module,
        opt: torch.optim.Optimizer,
        grad_clip: float,
        context: DistContext = SINGLE_PROCESS,
    ) -> None:
        self.model, self.wrapped, self.opt, self.grad_clip, self.context = model, wrapped, opt, grad_clip, context

    def __call__(self, inputs, targets, mask, positions, count, what: str = "a training step") -> torch.Tensor:
        """One optimizer step on this rank's rows; returns the global batch's mean loss."""
        share = masked_loss(self.wrapped(inputs, positions), targets, mask, count)  # this slice's share
        loss = share.detach().clone()
        with self.context.collective(what):  # what: named in the error of a lost rank
            self.context.all_reduce_sum(loss)  # the sum of the shares: the mean loss of the global batch
            self.opt.zero_grad(set_to_none=True)
            (share * self.context.world_size).backward()  # DDP averages over ranks -> d(global loss)
        _check_finite(loss)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        return loss


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss)}")


class FastStep:
    """The compiled step (see the module docstring). ``bucket``: the sequence length every
    batch is right-padded to (``None``: batches keep their width)."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        grad_clip: float,
        *,
        bucket: int | None = None,
        context: DistContext = SINGLE_PROCESS,
    ) -> None:
        self.model, self.opt, self.grad_clip, self.bucket, self.context = model, opt, grad_clip, bucket, context
        named = list(model.named_parameters())  # tied weights appear once
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.graphs: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0

    def __call__(self, inputs, targets, mask, positions, count, what: str = "a training step") -> torch.Tensor:
        b, s = inputs.shape
        if self.bucket is not None and s < self.bucket:
            pad = self.bucket - s
            inputs, targets = F.pad(inputs, (0, pad), value=PAD), F.pad(targets, (0, pad), value=PAD)
            mask = None if mask is None else F.pad(mask, (0, pad), value=False)
            s = self.bucket
        # A graph is traced on the strides of its first batch: a padded batch is contiguous, a
        # batch of exactly the bucket's width is a slice of [b, s + 1] tokens (strides (s + 1, 1)),
        # and the traced reshape is a view that fails on it. Every batch is made contiguous.
        inputs, targets = inputs.contiguous(), targets.contiguous()
        mask = None if mask is None else mask.contiguous()
        if positions.dim() != 1 or not torch.equal(positions, torch.arange(positions.shape[0])):
            raise ValueError("the fast step needs positions arange(s) [s]; use the reference step")
        key = (b, s, mask is None)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._compile(inputs, targets, mask, count)
        count_t = torch.tensor(float(count))
        with torch.no_grad():
            share, grads = graph(self.params, inputs, targets, mask, count_t)
        loss = share.clone()
        with self.context.collective(what):  # what: named in the error of a lost rank
            self.context.all_reduce_sum(loss)
            if self.context.world_size > 1:  # the gradient of the global loss: the sum of the shares' gradients
                flat = torch.cat([g.reshape(-1) for g in grads])
                self.context.all_reduce_sum(flat)
                grads = list(flat.split([g.numel() for g in grads]))
        _check_finite(loss)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.view_as(p)
        nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.opt.step()
        for p in self.params:
            p.grad = None
        return loss

    def _compile(self, inputs, targets, mask, count) -> Callable:
        import time

        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.nn.attention import SDPBackend, sdpa_kernel

        t0 = time.perf_counter()
        model, names = self.model, self.names
        positions = torch.arange(inputs.shape[1])  # a constant of the graph

        def joint(params, inputs, targets, mask, count):
            leaves = [p.detach().requires_grad_(True) for p in params]
            with torch.enable_grad():
                state = dict(zip(names, leaves, strict=True))
                logits = torch.func.functional_call(model, state, (inputs, positions), {"check_tokens": False})
                share = masked_loss(logits, targets, mask, count)
                grads = torch.autograd.grad(share, leaves)
            return share.detach(), list(grads)

        # Real tensors: the Python that reads positions runs now and its results become
        # constants (only positions, which are constants of the graph, are read).
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            gm = make_fx(joint, tracing_mode="real", _error_on_data_dependent_ops=False)(
                self.params, inputs, targets, mask, torch.tensor(float(count))
            )
        gm.graph.eliminate_dead_code()  # the reads of values (.item()) have no users left
        fold_constants(gm)
        compiled = torch.compile(gm, dynamic=False, fullgraph=True)
        with torch.no_grad():
            compiled(self.params, inputs, targets, mask, torch.tensor(float(count)))  # compile now, not in step 1
        self.compile_seconds += time.perf_counter() - t0
        return compiled


def fold_constants(gm: torch.fx.GraphModule) -> int:
    """Evaluate every node that depends only on the graph's constants (not on its
    inputs) once, and replace the outermost ones by new constants. Returns how many
    constants were made."""
    values: dict[torch.fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = getattr(gm, node.target)
        elif node.op == "call_function" and _pure(node.target):
            deps = node.all_input_nodes
            if all(d in values for d in deps):
                args = torch.fx.node.map_arg(node.args, lambda n: values[n])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
                values[node] = node.target(*args, **kwargs)
    made = 0
    for node, value in list(values.items()):
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        if all(u in values for u in node.users):
            continue  # only used by other constants
        name = f"_folded_{made}"
        gm.register_buffer(name, value.detach().clone(), persistent=False)
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        node.replace_all_uses_with(new)
        made += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return made


def _pure(target: object) -> bool:
    """An aten op without randomness, mutation or a data-dependent output (or a getitem)."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return torch.Tag.data_dependent_output not in target.tags
