"""Fast rotary position embedding: q and k rotated in one call, near the memory limit.

Math (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding", arXiv:2104.09864): each pair ``(x_a, x_b)`` of rotated dimensions with
angle ``θ_i = position · inv_freq_i`` becomes

    x_a' = x_a cos θ_i − x_b sin θ_i
    x_b' = x_b cos θ_i + x_a sin θ_i

Layouts (which dimensions form pair ``i``, ``0 <= i < r/2``, ``r = rotary_dim``):

    half         (i, i + r/2)   GPT-NeoX / Llama ``rotate_half``
    interleaved  (2i, 2i + 1)   GPT-J / Mesh-TensorFlow ``rotate_every_two``

Dimensions ``r .. d-1`` pass through unchanged (partial rotary, GPT-NeoX ``rotary_pct``).

Shapes:
    q            [b, h, s_q, d]        k             [b, h_kv, s_k, d]
    cos, sin     [s_q, r/2] or [b|1, s_q, r/2]   one angle per pair (the exact cache)
    k_cos, k_sin [s_k, r/2] or [b|1, s_k, r/2]   for the keys; default ``cos``/``sin``

Two paths compute the same function:

* compiled: one ``torch.compile`` graph (inductor, ``dynamic=False``, ``fullgraph``)
  rotates q and k; each tensor is read once and written once in a single fused loop
  (multiply by ``[cos, cos]`` and add the partner dimension times ``[-sin, sin]``: no
  ``rotate_half`` concatenation, no temporaries). One compiled graph per shape, cached
  here; arithmetic in float32 (float64 for float64 inputs), rounded once.
* eager: ``out=``/``addcmul_`` into one preallocated output (four passes over halves,
  no temporaries; one half-size temporary in place), or a single complex multiply for
  the interleaved layout in float32/float64 (one pass, in place when asked). Arithmetic
  in the activation dtype, as in transformers.

``compiled="auto"`` compiles when the tensors are large enough for the launch cost
(tens of microseconds per call) to pay, and never inside an outer ``torch.compile``
trace, where the plain formula is returned for the outer graph to fuse.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable

import torch

from posenc.functional.checks import one_of

LAYOUTS = ("half", "interleaved")
#: ``compiled="auto"`` compiles from this many elements of q plus k (below it, the
#: per-call cost of a compiled graph exceeds what fusion saves; measured in
#: benchmarks/rope.py: the decode step s = 1 is faster eager).
AUTO_COMPILE_NUMEL = 1 << 16
_MAX_COMPILED = 64
_COMPILED: OrderedDict[tuple, Callable] = OrderedDict()


# -- validation --------------------------------------------------------------------------
def _check_qk(q: object, k: object) -> None:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [b, h, s, d], got shape {tuple(x.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {q.shape[0]} and k {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got q {q.shape[-1]} and k {k.shape[-1]}")


def _check_rotary_dim(rotary_dim: object, d: int) -> int:
    if rotary_dim is None:
        rotary_dim = d
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int or None, got {rotary_dim!r}")
    if rotary_dim < 2 or rotary_dim > d or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={d}], got {rotary_dim}")
    return rotary_dim


def _check_table(
    cos: object, sin: object, x: torch.Tensor, half: int, names: tuple[str, str], which: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``cos``/``sin`` ``[s, r/2]`` or ``[b|1, s, r/2]`` for ``x [b, h, s, d]``;
    returns them shaped to broadcast against ``x``: ``[s, r/2]`` or ``[b|1, 1, s, r/2]``."""
    for name, t in zip(names, (cos, sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {which} is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    b, s = x.shape[0], x.shape[2]
    ok = (cos.dim() == 2 and cos.shape == (s, half)) or (
        cos.dim() == 3 and cos.shape[0] in (1, b) and cos.shape[1:] == (s, half)
    )
    if not ok:
        raise ValueError(
            f"{names[0]}/{names[1]} must have shape [s, rotary_dim/2] = [{s}, {half}] or [b, s, rotary_dim/2] "
            f"(b = {b} or 1) to rotate {which} of shape {tuple(x.shape)}; got {tuple(cos.shape)}"
        )
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [b|1, 1, s, r/2]
    return cos, sin


# -- the math, written once for the compiled path and for outer torch.compile traces ---------
def _partner(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Each rotated dimension's pair partner: ``x [..., r]`` -> ``[..., r]``."""
    r = x.shape[-1]
    if layout == "half":
        # [..., 2, r/2]: swap the two halves -> (x_{i+r/2}, x_i)
        return x.unflatten(-1, (2, r // 2)).flip(-2).flatten(-2)
    # [..., r/2, 2]: swap within each pair -> (x_{2i+1}, x_{2i})
    return x.unflatten(-1, (r // 2, 2)).flip(-1).flatten(-2)


def _widen(cos: torch.Tensor, sin: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair tables ``[..., r/2]`` -> per-dimension multipliers ``[..., r]``:
    ``cos`` for every dimension and ``sin`` signed ``-`` on the first of each pair."""
    if layout == "half":
        return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)  # [..., r]
    # [..., r/2, 2] -> [..., r]
    return torch.stack([cos, cos], -1).flatten(-2), torch.stack([-sin, sin], -1).flatten(-2)


def rotate_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int) -> torch.Tensor:
    """``x [b, h, s, d]`` rotated out of place as one pointwise expression (what the
    compiled path fuses): ``x·[cos, cos] + partner(x)·[-sin, sin]`` on the first
    ``rotary_dim`` dimensions, in float32 (float64 for float64 ``x``), rounded once.

    ``cos``/``sin`` are already shaped to broadcast: ``[s, r/2]`` or ``[b|1, 1, s, r/2]``.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, sn = _widen(cos.to(work), sin.to(work), layout)  # [..., s, r]
    xr = x[..., :rotary_dim]
    out = (xr.to(work) * c + _partner(xr, layout).to(work) * sn).to(x.dtype)  # [b, h, s, r]
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rotary_dim:]], -1)  # [b, h, s, d]


def _rotate_qk(q, k, cq, sq, ck, sk, layout: str, rotary_dim: int):
    return rotate_formula(q, cq, sq, layout, rotary_dim), rotate_formula(k, ck, sk, layout, rotary_dim)


def _rotate_qk_inplace(q, k, cq, sq, ck, sk, layout: str, rotary_dim: int):
    # Inductor cannot write a pair in place (each output reads its partner), so it
    # rotates into a buffer and copies back: two passes, still one call.
    q[..., :rotary_dim].copy_(rotate_formula(q[..., :rotary_dim], cq, sq, layout, rotary_dim))
    k[..., :rotary_dim].copy_(rotate_formula(k[..., :rotary_dim], ck, sk, layout, rotary_dim))
    return q, k


def _compiled(base: Callable, key: tuple) -> Callable:
    """The compiled graph for ``key`` (shapes, strides, dtypes, layout, ...), built once.

    Each key gets a fresh code object: dynamo keeps its cache and its recompile limit
    per code object, so every shape owns exactly one graph, is never recompiled, and
    never pushes another shape's graph out.
    """
    fn = _COMPILED.get(key)
    if fn is not None:
        _COMPILED.move_to_end(key)
        return fn
    name = f"{base.__name__}_{abs(hash(key)):x}"
    code = base.__code__.replace(co_name=name)
    fresh = types.FunctionType(code, base.__globals__, name, base.__defaults__, base.__closure__)
    fn = torch.compile(fresh, dynamic=False, fullgraph=True)
    _COMPILED[key] = fn
    if len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return fn


def clear_compiled_cache() -> None:
    """Forget every compiled rotary graph (they are rebuilt on the next call)."""
    _COMPILED.clear()


# -- eager kernels -----------------------------------------------------------------------------
def _pairs(x: torch.Tensor, layout: str, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the first and second member of every pair: ``[b, h, s, r/2]`` each."""
    half = rotary_dim // 2
    if layout == "half":
        return x[..., :half], x[..., half:rotary_dim]
    return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]


def _complex_view(x: torch.Tensor, rotary_dim: int) -> torch.Tensor | None:
    """``x[..., :r]`` as complex ``[b, h, s, r/2]`` (interleaved pairs), or ``None`` when the
    dtype or the strides do not allow it."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    xr = x[..., :rotary_dim].unflatten(-1, (rotary_dim // 2, 2))  # [b, h, s, r/2, 2]
    if xr.stride(-1) != 1 or any(st % 2 for st in xr.stride()[:-1]) or xr.storage_offset() % 2:
        return None
    return torch.view_as_complex(xr)


def _rotate_eager(x: torch.Tensor, cos, sin, layout: str, rotary_dim: int, inplace: bool) -> torch.Tensor:
    """One tensor, eager, without full-size temporaries. ``x [b, h, s, d]``."""
    out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    z = _complex_view(x, rotary_dim) if layout == "interleaved" else None
    zo = z if inplace else (_complex_view(out, rotary_dim) if z is not None else None)
    if z is not None and zo is not None:
        w = torch.complex(cos.to(x.dtype), sin.to(x.dtype))  # [..., s, r/2] e^{iθ}
        torch.mul(z, w, out=zo)  # one pass: (x_a + i x_b) e^{iθ}
    else:
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = _pairs(x, layout, rotary_dim)  # [b, h, s, r/2] each
        if inplace:
            t = x1 * s  # x_a sin θ, kept before x_a is overwritten (half-size temporary)
            x1.mul_(c).addcmul_(x2, s, value=-1)
            x2.mul_(c).add_(t)
        else:
            o1, o2 = _pairs(out, layout, rotary_dim)
            torch.mul(x1, c, out=o1)
            o1.addcmul_(x2, s, value=-1)
            torch.mul(x2, c, out=o2)
            o2.addcmul_(x1, s)
    if not inplace and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


# -- public entry point ------------------------------------------------------------------------
def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "half",
    rotary_dim: int | None = None,
    inplace: bool = False,
    compiled: bool | str = "auto",
    k_cos: torch.Tensor | None = None,
    k_sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys in one call (see the module docstring for the math).

    Args:
        q: queries ``[b, h, s_q, d]``.
        k: keys ``[b, h_kv, s_k, d]`` (``h_kv`` may differ from ``h``: GQA/MQA).
        cos, sin: ``[s_q, r/2]`` or ``[b|1, s_q, r/2]``, ``cos θ``/``sin θ`` of the
            query positions, one column per pair ``i`` (angle ``position · inv_freq_i``).
            Any floating dtype; float32 or float64 from an exact angle cache is best.
        layout: ``"half"`` (NeoX/Llama) or ``"interleaved"`` (GPT-J).
        rotary_dim: ``r``, the number of leading dimensions rotated (even, <= d);
            ``None``: all of them.
        inplace: write the result into ``q`` and ``k`` and return them.
        compiled: ``True`` (torch.compile'd graph, cached per shape), ``False``
            (eager), or ``"auto"`` (compiled from ``AUTO_COMPILE_NUMEL`` elements,
            except inside an outer torch.compile trace; in place, the interleaved layout
            in float32/float64 takes the one-pass complex multiply instead).
        k_cos, k_sin: tables of the key positions ``[s_k, r/2]`` or ``[b|1, s_k, r/2]``
            when they differ from the queries' (KV-cache decoding); both or neither.

    Returns:
        ``(q_rotated, k_rotated)`` with the shapes and dtype of ``q`` and ``k``.

    Example:
        >>> q, k = torch.randn(1, 8, 16, 64), torch.randn(1, 2, 16, 64)
        >>> theta = torch.arange(16.0)[:, None] * 10000 ** (-torch.arange(0, 64, 2) / 64)
        >>> qr, kr = apply_rotary(q, k, theta.cos(), theta.sin(), layout="half")
    """
    _check_qk(q, k)
    one_of("layout", layout, LAYOUTS)
    rotary_dim = _check_rotary_dim(rotary_dim, q.shape[-1])
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if not (isinstance(compiled, bool) or compiled == "auto"):
        raise ValueError(f"compiled must be True, False or 'auto', got {compiled!r}")
    half = rotary_dim // 2
    cq, sq = _check_table(cos, sin, q, half, ("cos", "sin"), "q")
    if (k_cos is None) != (k_sin is None):
        raise ValueError("k_cos and k_sin must be given together (or neither)")
    if k_cos is None:
        if k.shape[2] != q.shape[2]:
            raise ValueError(
                f"q has {q.shape[2]} positions and k has {k.shape[2]}: pass k_cos/k_sin for the key positions"
            )
        ck, sk = cq, sq
    else:
        ck, sk = _check_table(k_cos, k_sin, k, half, ("k_cos", "k_sin"), "k")

    if torch.compiler.is_compiling():
        # Inside an outer graph: hand it the plain formula to fuse with its neighbours.
        if inplace:
            return _rotate_qk_inplace(q, k, cq, sq, ck, sk, layout, rotary_dim)
        return _rotate_qk(q, k, cq, sq, ck, sk, layout, rotary_dim)

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    use_compiled = compiled is True
    if compiled == "auto":
        complex_inplace = (
            inplace and layout == "interleaved" and not needs_grad and _complex_view(q, rotary_dim) is not None
        )
        use_compiled = q.numel() + k.numel() >= AUTO_COMPILE_NUMEL and not complex_inplace
    if use_compiled:
        key = (
            layout,
            rotary_dim,
            inplace,
            q.device,
            q.dtype,
            torch.is_grad_enabled(),
            *((t.shape, t.stride(), t.dtype, t.requires_grad) for t in (q, k, cq, sq, ck, sk)),
            ck is cq,
        )
        fn = _compiled(_rotate_qk_inplace if inplace else _rotate_qk, key)
        return fn(q, k, cq, sq, ck, sk, layout, rotary_dim)
    if needs_grad:
        # out= and complex views do not record autograd: use the differentiable formula.
        if inplace:
            return _rotate_qk_inplace(q, k, cq, sq, ck, sk, layout, rotary_dim)
        return _rotate_qk(q, k, cq, sq, ck, sk, layout, rotary_dim)
    return (
        _rotate_eager(q, cq, sq, layout, rotary_dim, inplace),
        _rotate_eager(k, ck, sk, layout, rotary_dim, inplace),
    )
