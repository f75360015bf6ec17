"""A Triton kernel for the rotary path on CUDA GPUs: q and k rotated in one launch.

A private backend of :func:`posenc.functional.apply_rotary` (reached with
``compiled="triton"``); call ``apply_rotary``, not :func:`kernel`.

Math (Su et al. 2021, "RoFormer", arXiv:2104.09864), for every row (one position of one
head) and pair ``i < r/2`` with angle ``θ_i``:

    x_a' = x_a cos θ_i − x_b sin θ_i
    x_b' = x_b cos θ_i + x_a sin θ_i

with ``(a, b) = (i, i + r/2)`` in the half layout and ``(2i, 2i + 1)`` in the interleaved
one. One program rotates ``BLOCK`` positions of one ``(batch, head)`` of q and of k: it
loads both members of every pair once and stores both once (one read and one write of
every rotated element, the memory traffic of a copy), in place or into a separate output. Arithmetic
in float32 (float64 for float64 inputs), rounded once, like the compiled CPU path.

Shapes:
    q, k      [b, h, s_q, d], [b, h_kv, s_k, d]   last dimension contiguous (stride 1)
    cos, sin  [s, r/2] or [b|1, 1, s, r/2]   as ``apply_rotary`` shapes them

Where it runs: ``apply_rotary(..., compiled="triton")`` on CUDA tensors without autograd.
Timings in docs/performance.md (``benchmarks/gpu_check.sh``): at the memory limit when
replayed from a CUDA graph, but launched from Python its CPU dispatch costs more than
the GPU work at common sizes, so ``compiled="auto"`` does not choose it.
Without a GPU, Triton's interpreter (``TRITON_INTERPRET=1`` set before the first call)
runs the same kernel on CPU tensors: that is how the test suite checks it against the
reference formula on a machine without a GPU. Forward only: under autograd ``apply_rotary`` uses
its differentiable paths.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: Pairs per program: ``BLOCK`` positions x ``BLOCK_P`` pairs, with ``BLOCK`` chosen so
#: that a tile holds about this many pairs (64 positions at head_dim 64, 32 at 128, 16 at
#: 256): enough loads in flight per program, small enough for registers.
TILE_PAIRS = 2048
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def installed() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel can rotate ``x`` here: Triton installed, a CUDA tensor (or
    any tensor under the interpreter), a supported dtype, last dimension contiguous."""
    return (
        x.dtype in DTYPES
        and x.stride(-1) == 1
        and (x.is_cuda or (interpreting() and x.device.type == "cpu"))
        and installed()
    )


@functools.cache
def _jit_kernel():
    """Build the ``triton.jit`` kernel on first use (so importing posenc never imports
    Triton, and the interpreter setting is read when the kernel is made)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(
        q_ptr,
        qo_ptr,
        k_ptr,
        ko_ptr,
        cq_ptr,
        sq_ptr,
        ck_ptr,
        sk_ptr,
        heads,
        heads_q,
        heads_k,
        seq_q,
        seq_k,
        sq_b,
        sq_h,
        sq_s,
        soq_b,
        soq_h,
        soq_s,
        sk_b,
        sk_h,
        sk_s,
        sok_b,
        sok_h,
        sok_s,
        tq_b,
        tq_s,
        tk_b,
        tk_s,
        HALF: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        SAME_TABLES: tl.constexpr,
        WORK: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    ):
        # One program: positions [pid_s * BLOCK, +BLOCK) of head hi of q and of k (masked
        # off where hi >= that tensor's heads or a row >= its length): one launch for both.
        pid_bh = tl.program_id(0)  # b * heads + head, heads = max(h_q, h_kv)
        bi = (pid_bh // heads).to(tl.int64)
        hi = pid_bh % heads
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        pairs = tl.arange(0, BLOCK_P)  # [BLOCK_P], padded to a power of two
        if INTERLEAVED:
            ia = 2 * pairs
            ib = 2 * pairs + 1
        else:
            ia = pairs
            ib = pairs + HALF
        in_pairs = pairs[None, :] < HALF  # [1, BLOCK_P]
        # rows past the length, or every row of a head the tensor does not have, are masked
        len_q = seq_q * (hi < heads_q).to(tl.int32)
        len_k = seq_k * (hi < heads_k).to(tl.int32)
        mask_q = (rows[:, None] < len_q) & in_pairs  # [BLOCK, BLOCK_P]
        mask_k = (rows[:, None] < len_k) & in_pairs
        mask_t = (rows[:, None] < seq_q) & in_pairs  # q's tables, also k's when shared
        t_q = bi * tq_b + rows[:, None] * tq_s + pairs[None, :]  # [BLOCK, BLOCK_P] table offsets
        x_q = q_ptr + bi * sq_b + hi * sq_h + rows[:, None] * sq_s  # [BLOCK, 1]
        o_q = qo_ptr + bi * soq_b + hi * soq_h + rows[:, None] * soq_s
        x_k = k_ptr + bi * sk_b + hi * sk_h + rows[:, None] * sk_s
        o_k = ko_ptr + bi * sok_b + hi * sok_h + rows[:, None] * sok_s
        c = tl.load(cq_ptr + t_q, mask=mask_t).to(WORK)
        sn = tl.load(sq_ptr + t_q, mask=mask_t).to(WORK)
        qa = tl.load(x_q + ia[None, :], mask=mask_q).to(WORK)
        qb = tl.load(x_q + ib[None, :], mask=mask_q).to(WORK)
        ka = tl.load(x_k + ia[None, :], mask=mask_k).to(WORK)
        kb = tl.load(x_k + ib[None, :], mask=mask_k).to(WORK)
        tl.store(o_q + ia[None, :], (qa * c - qb * sn).to(qo_ptr.dtype.element_ty), mask=mask_q)
        tl.store(o_q + ib[None, :], (qb * c + qa * sn).to(qo_ptr.dtype.element_ty), mask=mask_q)
        if not SAME_TABLES:
            t_k = bi * tk_b + rows[:, None] * tk_s + pairs[None, :]
            c = tl.load(ck_ptr + t_k, mask=mask_k).to(WORK)
            sn = tl.load(sk_ptr + t_k, mask=mask_k).to(WORK)
        tl.store(o_k + ia[None, :], (ka * c - kb * sn).to(ko_ptr.dtype.element_ty), mask=mask_k)
        tl.store(o_k + ib[None, :], (kb * c + ka * sn).to(ko_ptr.dtype.element_ty), mask=mask_k)

    return rope_kernel


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _tables(cos: torch.Tensor, sin: torch.Tensor, s: int, half: int, work: torch.dtype):
    """``[s, r/2]`` or ``[b|1, 1, s, r/2]`` -> ``[b|1, s, r/2]`` contiguous in ``work``, and the
    batch stride (0 for a table shared by the batch)."""
    c = cos.to(work).reshape(-1, s, half).contiguous()  # [b|1, s, r/2]
    sn = sin.to(work).reshape(-1, s, half).contiguous()
    return c, sn, (0 if c.shape[0] == 1 else c.stride(0))


def _output(x: torch.Tensor, rotary_dim: int, inplace: bool) -> torch.Tensor:
    if inplace:
        return x
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])  # pass-through dimensions
    return out


def kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    cq: torch.Tensor,
    sq: torch.Tensor,
    ck: torch.Tensor,
    sk: torch.Tensor,
    layout: str,
    rotary_dim: int,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [b, h, s_q, d]`` and ``k [b, h_kv, s_k, d]`` with one kernel launch;
    returns them (in place) or new tensors. Tables ``cq``/``sq`` (queries) and ``ck``/``sk``
    (keys): ``[s, r/2]`` or ``[b|1, 1, s, r/2]``, validated by the caller; ``ck is cq``
    when both use the same positions (the tables are then loaded once per tile).

    Raises:
        RuntimeError: Triton is not installed, or a tensor is not a CUDA tensor (outside the
            interpreter), or its dtype or strides are not supported; the message says which.
    """
    if not installed():
        raise RuntimeError("the Triton rotary kernel needs the 'triton' package (pip install triton)")
    for x in (q, k):
        if not supports(x):
            raise RuntimeError(
                f"the Triton rotary kernel cannot rotate this tensor (device {x.device}, dtype {x.dtype}, "
                f"strides {tuple(x.stride())}): it needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), a dtype "
                f"in {[str(t) for t in DTYPES]} and a contiguous last dimension"
            )
    import triton.language as tl

    b, h_q, s_q, _ = q.shape
    h_k, s_k = k.shape[1], k.shape[2]
    half = rotary_dim // 2
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    same = ck is cq and sk is sq
    c_q, s_q_t, tq_b = _tables(cq, sq, s_q, half, work)
    c_k, s_k_t, tk_b = (c_q, s_q_t, tq_b) if same else _tables(ck, sk, s_k, half, work)
    qo, ko = _output(q, rotary_dim, inplace), _output(k, rotary_dim, inplace)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    block_p = _next_pow2(half)
    block = min(max(TILE_PAIRS // block_p, 1), _next_pow2(max(s_q, s_k)))
    grid = (b * max(h_q, h_k), _cdiv(max(s_q, s_k), block))
    _jit_kernel()[grid](
        q,
        qo,
        k,
        ko,
        c_q,
        s_q_t,
        c_k,
        s_k_t,
        max(h_q, h_k),
        h_q,
        h_k,
        s_q,
        s_k,
        *q.stride()[:3],
        *qo.stride()[:3],
        *k.stride()[:3],
        *ko.stride()[:3],
        tq_b,
        c_q.stride(1),
        tk_b,
        c_k.stride(1),
        HALF=half,
        BLOCK_P=block_p,
        BLOCK=block,
        INTERLEAVED=layout == "interleaved",
        SAME_TABLES=same,
        WORK=tl.float64 if work == torch.float64 else tl.float32,
    )
    return qo, ko


def _cdiv(n: int, d: int) -> int:
    return (n + d - 1) // d
