"""The rotation of RoPE: :func:`apply_rotary` rotates q and k in one call, near the memory
limit. It is the one public way to rotate in posenc (every rotary encoding calls it); the
paths below, including the kernels of ``rope_native`` and ``rope_triton``, are its private
implementation details.

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

Paths (all compute the same function; ``compiled="auto"`` picks):

* compiled: one ``torch.compile`` graph (inductor, ``dynamic=False``, ``fullgraph``)
  rotates q and k; each tensor is read once and written once by a single fused loop over
  pairs (no ``rotate_half`` concatenation, no temporaries). One compiled graph per shape,
  cached here; arithmetic in float32 (float64 for float64 inputs), rounded once. Backward
  is compiled too. In place, inductor rotates into a buffer and copies back (two passes):
  it cannot prove that a loop reading a pair and writing it is safe in place.
* triton (``compiled="triton"``; CUDA tensors, no autograd): one kernel launch for q and
  k, in place or out of place, both layouts (``rope_triton``). Opt-in: at the memory
  limit under CUDA graphs, but its launch from Python costs more than the compiled
  graph's at common sizes (docs/performance.md).
* native, in place (half layout, float32/bfloat16, CPU, no autograd, ``"auto"``): a C
  loop over pairs, one read and one write of every element (``rope_native``); inductor
  would need a buffer and a copy back.
* complex (interleaved layout, float32/float64, no autograd): one complex multiply
  ``(x_a + i x_b) e^{iθ}``, a single vectorized pass, truly in place when asked.
* eager, large: ``out=``/``addcmul_`` on half-size views of one preallocated output (no
  full-size temporary; one half-size temporary in place).
* eager, small (decode, below ``AUTO_COMPILE_NUMEL`` elements): three ops per tensor,
  ``x·[cos, cos] + partner(x)·[-sin, sin]``, where launch cost, not memory, dominates.

The eager paths compute in the activation dtype (as transformers does). Under autograd
the eager fallback is the plain differentiable formula; inside an outer
``torch.compile`` trace the plain formula is returned for the outer graph to fuse.
"""

from __future__ import annotations

import types
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import torch

from posenc.functional import rope_native, rope_triton
from posenc.functional.checks import check_qk, one_of
from posenc.functional.rope import LAYOUTS

#: ``compiled="auto"`` compiles from this many elements of q plus k (below it, the
#: per-call cost of a compiled graph exceeds what fusion saves; measured in
#: benchmarks/rope.py: the decode step s = 1 is faster eager).
AUTO_COMPILE_NUMEL = 1 << 16
#: ... and once the same shape has come more than this many times among the last
#: ``AUTO_COMPILE_WINDOW`` uncompiled calls: a compilation costs seconds, so shapes that
#: come and go stay eager (a KV cache growing by one key per step; a sweep over lengths,
#: also when repeated batch after batch, as prefix-by-prefix scoring does: counted over
#: all time, each of its lengths came often enough to compile, and most of a dynamic-NTK
#: scoring's time went to compiling them), while a training loop compiles after its
#: first steps.
AUTO_COMPILE_AFTER = 16
AUTO_COMPILE_WINDOW = 64
_MAX_COMPILED = 64
_COMPILED: OrderedDict[tuple, Callable] = OrderedDict()
_RECENT: deque[tuple] = deque()  # the keys of the last AUTO_COMPILE_WINDOW uncompiled calls
_SEEN: Counter[tuple] = Counter()  # how often each key occurs in _RECENT


# -- validation --------------------------------------------------------------------------
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
    for name, t in zip(names, (cos, sin), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {which} is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
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
def _pairwise_rotation(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int
) -> torch.Tensor:
    """``x [b, h, s, d]`` rotated out of place as one pointwise expression over pairs (what
    the compiled path fuses into one loop that reads both members of a pair and writes
    both), in float32 (float64 for float64 ``x``), rounded once.

    ``cos``/``sin`` are already shaped to broadcast: ``[s, r/2]`` or ``[b|1, 1, s, r/2]``.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = rotary_dim
    xr = x[..., :r]
    if layout == "half":
        pairs = xr.unflatten(-1, (2, r // 2))  # [b, h, s, 2, r/2]
        x1, x2, pair_dim = pairs[..., 0, :], pairs[..., 1, :], -2
    else:
        pairs = xr.unflatten(-1, (r // 2, 2))  # [b, h, s, r/2, 2]
        x1, x2, pair_dim = pairs[..., 0], pairs[..., 1], -1
    x1, x2, c, s = x1.to(work), x2.to(work), cos.to(work), sin.to(work)  # [b, h, s, r/2]
    # Round each member before stacking: the stacked buffer is then written once, in x.dtype.
    first, second = (x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype)
    out = torch.stack([first, second], pair_dim).flatten(-2)  # [b, h, s, r]
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:]], -1)  # [b, h, s, d]


def _rotate_qk(q, k, cq, sq, ck, sk, layout: str, rotary_dim: int):
    return _pairwise_rotation(q, cq, sq, layout, rotary_dim), _pairwise_rotation(k, ck, sk, layout, rotary_dim)


def _rotate_qk_inplace(q, k, cq, sq, ck, sk, layout: str, rotary_dim: int):
    # Inductor cannot write a pair in place (each output reads its partner), so it
    # rotates into a buffer and copies back: two passes, still one call.
    q[..., :rotary_dim].copy_(_pairwise_rotation(q[..., :rotary_dim], cq, sq, layout, rotary_dim))
    k[..., :rotary_dim].copy_(_pairwise_rotation(k[..., :rotary_dim], ck, sk, layout, rotary_dim))
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


def _hot(key: tuple) -> bool:
    """Count a call with ``key``; True once it makes more than ``AUTO_COMPILE_AFTER`` of the
    last ``AUTO_COMPILE_WINDOW`` uncompiled calls."""
    _RECENT.append(key)
    _SEEN[key] += 1
    while len(_RECENT) > AUTO_COMPILE_WINDOW:
        old = _RECENT.popleft()
        _SEEN[old] -= 1
        if not _SEEN[old]:
            del _SEEN[old]
    return _SEEN[key] > AUTO_COMPILE_AFTER


def clear_compiled_cache() -> None:
    """Forget every compiled rotary graph and call count (graphs are rebuilt on demand)."""
    _COMPILED.clear()
    _RECENT.clear()
    _SEEN.clear()


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
    st = x.stride()
    if st[-1] != 1 or st[0] % 2 or st[1] % 2 or st[2] % 2 or x.storage_offset() % 2:
        return None
    xr = x if rotary_dim == x.shape[-1] else x[..., :rotary_dim]
    return torch.view_as_complex(xr.unflatten(-1, (rotary_dim // 2, 2)))  # [b, h, s, r/2]


def _rotate_complex(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, rotary_dim: int, inplace: bool) -> torch.Tensor:
    """Interleaved layout, float32/float64: one complex multiply ``(x_a + i x_b) e^{iθ}``,
    a single pass (in place when asked). ``x [b, h, s, d]``, ``z`` its complex view
    ``[b, h, s, r/2]``, ``w = e^{iθ} [..., s, r/2]``."""
    if inplace:
        z.mul_(w)
        return x
    if rotary_dim == x.shape[-1]:
        return torch.view_as_real(z * w).flatten(-2)  # [b, h, s, r/2, 2] -> [b, h, s, d]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.mul(z, w, out=_complex_view(out, rotary_dim))
    out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


def _rotate_large(x: torch.Tensor, cos, sin, layout: str, rotary_dim: int, inplace: bool) -> torch.Tensor:
    """Eager, large tensors: ``out=``/``addcmul_`` on half-size views of one output, no
    full-size temporary (one half-size temporary in place). ``x [b, h, s, d]``."""
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = _pairs(x, layout, rotary_dim)  # [b, h, s, r/2] each
    if inplace:
        t = x1 * s  # x_a sin θ, kept before x_a is overwritten
        x1.mul_(c).addcmul_(x2, s, value=-1)
        x2.mul_(c).add_(t)
        return x
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    o1, o2 = _pairs(out, layout, rotary_dim)
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


def _small_tables(cos, sin, layout: str, rotary_dim: int, d: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension multipliers ``[..., d]`` for the small path: ``cos`` on every rotated
    dimension and ``sin`` signed ``-`` on the first member of each pair; 1 and 0 on the
    pass-through dimensions."""
    if layout == "half":  # one concatenation and at most one cast for both: few dispatched ops
        both = torch.cat([cos, cos, -sin, sin], -1)  # [..., s, 2r]
        both = both if both.dtype == dtype else both.to(dtype)
        cw, sw = both[..., :rotary_dim], both[..., rotary_dim:]  # [..., s, r] each
    else:
        c = cos if cos.dtype == dtype else cos.to(dtype)  # [..., s, r/2] (no dispatch when it already is)
        s = sin if sin.dtype == dtype else sin.to(dtype)
        cw, sw = torch.stack([c, c], -1).flatten(-2), torch.stack([-s, s], -1).flatten(-2)  # [..., s, r]
    if rotary_dim < d:
        cw = torch.nn.functional.pad(cw, (0, d - rotary_dim), value=1.0)  # [..., s, d]
        sw = torch.nn.functional.pad(sw, (0, d - rotary_dim), value=0.0)
    return cw, sw


def _partner(x: torch.Tensor, layout: str, rotary_dim: int) -> torch.Tensor:
    """Each dimension's pair partner (pass-through dimensions: themselves), one op.
    ``x [..., d]`` -> ``[..., d]``."""
    half = rotary_dim // 2
    if layout == "interleaved":
        # [..., d/2, 2]: swap within every pair (pass-through pairs are multiplied by 0)
        return x.unflatten(-1, (x.shape[-1] // 2, 2)).flip(-1).flatten(-2)
    if rotary_dim == x.shape[-1]:
        return x.roll(half, -1)  # swap the two halves
    return torch.cat([x[..., half:rotary_dim], x[..., :half], x[..., rotary_dim:]], -1)


def _rotate_small(x: torch.Tensor, cw, sw, layout: str, rotary_dim: int, inplace: bool) -> torch.Tensor:
    """Eager, small tensors (decode): three ops, ``x·cw + partner(x)·sw``; per-op launch
    cost dominates here, not memory traffic. ``x [b, h, s, d]``."""
    p = _partner(x, layout, rotary_dim)  # a copy: safe to read after x is overwritten
    out = x.mul_(cw) if inplace else x * cw
    return out.addcmul_(p, sw)


def _rotate_small_pair(q, k, tq, tk, layout: str, rotary_dim: int, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_rotate_small`` of q and k together without autograd (decode): the two partners,
    then one ``_foreach`` multiply and one ``_foreach`` multiply-add for both tensors, so
    four dispatched ops instead of six (benchmarks/rope.py, decode row). ``q, k [b, h, s, d]``;
    ``tq, tk``: the ``(cw, sw)`` multipliers of ``_small_tables``."""
    partners = [_partner(q, layout, rotary_dim), _partner(k, layout, rotary_dim)]  # copies, read after x changes
    if inplace:
        torch._foreach_mul_([q, k], [tq[0], tk[0]])
        out = [q, k]
    else:
        out = list(torch._foreach_mul([q, k], [tq[0], tk[0]]))
    torch._foreach_addcmul_(out, partners, [tq[1], tk[1]])
    return out[0], out[1]


def _native_ok() -> bool:
    """Whether the native in-place kernel is built; warns once (with the reason) if not."""
    if rope_native.available():
        return True
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            f"posenc: the native in-place rotary kernel could not be built ({rope_native.unavailable_reason()}); "
            "apply_rotary(inplace=True, layout='half') uses torch.compile instead (two passes, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


_WARNED: list[bool] = []


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
            (eager), ``"triton"`` (the Triton kernel: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``; forward only), or ``"auto"``: compiled from
            ``AUTO_COMPILE_NUMEL`` elements once the same shape has come more than
            ``AUTO_COMPILE_AFTER`` times among the last ``AUTO_COMPILE_WINDOW``
            uncompiled calls, never inside an outer
            torch.compile trace; without autograd the interleaved layout in
            float32/float64 takes the one-pass complex multiply instead, and the half
            layout in place (float32/bfloat16, CPU) the native kernel.
        k_cos, k_sin: tables of the key positions ``[s_k, r/2]`` or ``[b|1, s_k, r/2]``
            when they differ from the queries' (KV-cache decoding); both or neither.

    Returns:
        ``(q_rotated, k_rotated)`` with the shapes and dtype of ``q`` and ``k``.

    Example:
        >>> q, k = torch.randn(1, 8, 16, 64), torch.randn(1, 2, 16, 64)
        >>> theta = torch.arange(16.0)[:, None] * 10000 ** (-torch.arange(0, 64, 2) / 64)
        >>> qr, kr = apply_rotary(q, k, theta.cos(), theta.sin(), layout="half")
    """
    check_qk(q, k)
    one_of("layout", layout, LAYOUTS)
    rotary_dim = _check_rotary_dim(rotary_dim, q.shape[-1])
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if not (isinstance(compiled, bool) or compiled in ("auto", "triton")):
        raise ValueError(f"compiled must be True, False, 'auto' or 'triton', got {compiled!r}")
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
    if compiled == "triton":
        if needs_grad:
            raise ValueError("compiled='triton' is forward only: under autograd use compiled='auto' (or True/False)")
        return rope_triton.kernel(q, k, cq, sq, ck, sk, layout, rotary_dim, inplace)
    small = q.numel() + k.numel() < AUTO_COMPILE_NUMEL
    if inplace and layout == "half" and compiled == "auto" and not needs_grad and not small:
        if rope_native.supports(q, rotary_dim) and rope_native.supports(k, rotary_dim) and _native_ok():
            rope_native.kernel(q, cq, sq, rotary_dim)
            return q, rope_native.kernel(k, ck, sk, rotary_dim)
    zq = zk = None
    if layout == "interleaved" and not needs_grad:
        zq, zk = _complex_view(q, rotary_dim), _complex_view(k, rotary_dim)
    use_complex = zq is not None and zk is not None
    if compiled is True or (compiled == "auto" and not small and not use_complex):
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
        if compiled is True or key in _COMPILED or _hot(key):
            fn = _compiled(_rotate_qk_inplace if inplace else _rotate_qk, key)
            return fn(q, k, cq, sq, ck, sk, layout, rotary_dim)
    if needs_grad and not small:
        # out= and complex views do not record autograd: the plain formula does.
        if inplace:
            return _rotate_qk_inplace(q, k, cq, sq, ck, sk, layout, rotary_dim)
        return _rotate_qk(q, k, cq, sq, ck, sk, layout, rotary_dim)
    if use_complex:
        wq = torch.complex(cq.to(q.dtype), sq.to(q.dtype))  # [..., s_q, r/2]: e^{iθ}
        wk = wq if ck is cq else torch.complex(ck.to(k.dtype), sk.to(k.dtype))
        return _rotate_complex(q, zq, wq, rotary_dim, inplace), _rotate_complex(k, zk, wk, rotary_dim, inplace)
    if small:
        d = q.shape[-1]
        tq = _small_tables(cq, sq, layout, rotary_dim, d, q.dtype)
        tk = tq if ck is cq else _small_tables(ck, sk, layout, rotary_dim, d, k.dtype)
        if not needs_grad:
            return _rotate_small_pair(q, k, tq, tk, layout, rotary_dim, inplace)
        return _rotate_small(q, *tq, layout, rotary_dim, inplace), _rotate_small(k, *tk, layout, rotary_dim, inplace)
    return _rotate_large(q, cq, sq, layout, rotary_dim, inplace), _rotate_large(k, ck, sk, layout, rotary_dim, inplace)
