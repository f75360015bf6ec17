"""A Triton kernel for the rotary path on CUDA GPUs: q or k rotated in one pass.

Math (Su et al. 2021, "RoFormer", arXiv:2104.09864), for every row (one position of one
head) and pair ``i < r/2`` with angle ``θ_i``:

    x_a' = x_a cos θ_i − x_b sin θ_i
    x_b' = x_b cos θ_i + x_a sin θ_i

with ``(a, b) = (i, i + r/2)`` in the half layout and ``(2i, 2i + 1)`` in the interleaved
one. One program rotates ``BLOCK_S`` positions of one ``(batch, head)``: it loads both
members of every pair once and stores both once (one read and one write of every rotated
element, the memory traffic of a copy), in place or into a separate output. Arithmetic
in float32 (float64 for float64 inputs), rounded once, like the compiled CPU path.

Shapes:
    x         [b, h, s, d]               last dimension contiguous (stride 1)
    cos, sin  [s, r/2] or [b|1, 1, s, r/2]   as ``rope_fast._check_table`` returns them

Where it runs: ``apply_rotary(..., compiled="triton")`` on CUDA tensors without autograd.
It is opt-in, not yet chosen by ``compiled="auto"``: no session has had a GPU to compile
and time it (``benchmarks/rope_gpu.py`` does both, in one run). Without a GPU,
Triton's interpreter (``TRITON_INTERPRET=1`` set before the first call) runs the same
kernel on CPU tensors: that is how the test suite checks it against the reference
formula on a machine without a GPU. Forward only: under autograd ``apply_rotary`` uses
its differentiable paths.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: Positions per program. 16 rows x r/2 pairs keeps a program's tile small enough for
#: registers at head_dim 256 and large enough to amortise the cos/sin loads.
BLOCK_S = 16
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
def _kernel():
    """Build the ``triton.jit`` kernel on first use (so importing posenc never imports
    Triton, and the interpreter setting is read when the kernel is made)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(
        x_ptr,
        out_ptr,
        cos_ptr,
        sin_ptr,
        num_heads,
        seq_len,
        sx_b,
        sx_h,
        sx_s,
        so_b,
        so_h,
        so_s,
        sc_b,
        sc_s,
        HALF: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        FLOAT64: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)  # b * h + head
        pid_s = tl.program_id(1)  # block of positions
        bi = pid_bh // num_heads
        hi = pid_bh % num_heads
        rows = pid_s * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        pairs = tl.arange(0, BLOCK_P)  # [BLOCK_P], padded to a power of two
        mask = (rows[:, None] < seq_len) & (pairs[None, :] < HALF)  # [BLOCK, BLOCK_P]
        if INTERLEAVED:
            ia = 2 * pairs
            ib = 2 * pairs + 1
        else:
            ia = pairs
            ib = pairs + HALF
        t_off = bi * sc_b + rows[:, None] * sc_s + pairs[None, :]
        x_base = x_ptr + bi * sx_b + hi * sx_h + rows[:, None] * sx_s
        o_base = out_ptr + bi * so_b + hi * so_h + rows[:, None] * so_s
        if FLOAT64:
            c = tl.load(cos_ptr + t_off, mask=mask).to(tl.float64)
            s = tl.load(sin_ptr + t_off, mask=mask).to(tl.float64)
            xa = tl.load(x_base + ia[None, :], mask=mask).to(tl.float64)
            xb = tl.load(x_base + ib[None, :], mask=mask).to(tl.float64)
        else:
            c = tl.load(cos_ptr + t_off, mask=mask).to(tl.float32)
            s = tl.load(sin_ptr + t_off, mask=mask).to(tl.float32)
            xa = tl.load(x_base + ia[None, :], mask=mask).to(tl.float32)
            xb = tl.load(x_base + ib[None, :], mask=mask).to(tl.float32)
        out_a = xa * c - xb * s
        out_b = xb * c + xa * s
        tl.store(o_base + ia[None, :], out_a.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_base + ib[None, :], out_b.to(out_ptr.dtype.element_ty), mask=mask)

    return rope_kernel


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int, inplace: bool
) -> torch.Tensor:
    """Rotate ``x [b, h, s, d]`` with the Triton kernel; returns ``x`` (in place) or a new
    tensor. ``cos``/``sin``: ``[s, r/2]`` or ``[b|1, 1, s, r/2]`` (validated by the caller).

    Raises:
        RuntimeError: Triton is not installed, or ``x`` is not a CUDA tensor (outside the
            interpreter), or its dtype or strides are not supported; the message says which.
    """
    if not installed():
        raise RuntimeError("the Triton rotary kernel needs the 'triton' package (pip install triton)")
    if not supports(x):
        raise RuntimeError(
            f"the Triton rotary kernel cannot rotate this tensor (device {x.device}, dtype {x.dtype}, "
            f"strides {tuple(x.stride())}): it needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), a dtype in "
            f"{[str(t) for t in DTYPES]} and a contiguous last dimension"
        )
    b, h, s, d = x.shape
    half = rotary_dim // 2
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Tables as [b|1, s, r/2] with a contiguous last dimension, in the working dtype.
    c = cos.to(work).reshape(-1, s, half).contiguous()  # [b|1, s, r/2]
    sn = sin.to(work).reshape(-1, s, half).contiguous()
    sc_b = 0 if c.shape[0] == 1 else c.stride(0)
    if inplace:
        out = x
    else:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if rotary_dim < d:
            out[..., rotary_dim:].copy_(x[..., rotary_dim:])  # pass-through dimensions
    if x.numel() == 0:
        return out
    grid = (b * h, (s + BLOCK_S - 1) // BLOCK_S)
    _kernel()[grid](
        x,
        out,
        c,
        sn,
        h,
        s,
        *x.stride()[:3],
        *out.stride()[:3],
        sc_b,
        c.stride(1),
        HALF=half,
        BLOCK_P=_next_pow2(half),
        BLOCK=BLOCK_S,
        INTERLEAVED=layout == "interleaved",
        FLOAT64=work == torch.float64,
    )
    return out
