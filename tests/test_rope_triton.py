"""The Triton rotary kernel (posenc.functional.rope_triton) against the reference formula.

On a CUDA machine every test runs the compiled kernel on the GPU. Without one the kernel
runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``): the same kernel source,
indexing, masking and dtype conversions, executed with NumPy. (Never both in one
process: Triton 3.6's interpreter leaves ``triton.language`` patched, which breaks later
compiled kernels such as FlexAttention's.) Skipped where Triton is not installed (it is
in the dev extras).
"""

from __future__ import annotations

import pytest
import torch

from posenc.functional import rope_fast, rope_triton
from posenc.functional.rope import rope_cos_sin
from posenc.functional.rope_fast import apply_rotary

pytestmark = pytest.mark.skipif(not rope_triton.installed(), reason="triton is not installed (pip install triton)")


@pytest.fixture
def device(monkeypatch):
    """Where the kernel runs: compiled on the GPU when there is one, else Triton's
    interpreter on CPU tensors (the kernel built afresh for it, dropped after)."""
    if torch.cuda.is_available():
        yield "cuda"
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rope_triton._jit_kernel.cache_clear()
    yield "cpu"
    rope_triton._jit_kernel.cache_clear()


def _tables(s: int, half: int, batch: int | None = None, offset: int = 3, device: str = "cpu"):
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    pos = torch.arange(offset, offset + s) if batch is None else torch.arange(batch * s).view(batch, s) * 7 + offset
    cos, sin = rope_cos_sin(pos, inv_freq, dtype=torch.float64)  # [.., s, r/2]
    return cos.to(device), sin.to(device)


def _reference(x, cos, sin, layout, rotary_dim):
    """The rotation of the first ``rotary_dim`` dimensions computed in float32 (float64 for
    float64 ``x``) and rounded once to ``x.dtype``, as the kernel does."""
    c, s = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos, sin)  # [b|1, 1, s, r/2]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s, xr = c.to(work), s.to(work), x[..., :rotary_dim].to(work)
    half = rotary_dim // 2
    if layout == "half":
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat([(x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype)], -1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([(x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype)], -1).flatten(-2)
    return torch.cat([out, x[..., rotary_dim:]], -1)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rotary_dim", [24, 16])  # partial (24 of 24 is full at d = 24) and 16 of 24
def test_kernel_equals_the_formula(device, layout, dtype, rotary_dim):
    torch.manual_seed(0)
    # s = 37 is not a multiple of the block (masking); r/2 = 12 or 8 is padded to 16 lanes
    q = torch.randn(2, 4, 37, 24, dtype=dtype, device=device)
    k = torch.randn(2, 2, 37, 24, dtype=dtype, device=device)
    cos, sin = _tables(37, rotary_dim // 2, device=device)
    qr, kr = apply_rotary(q, k, cos, sin, layout=layout, rotary_dim=rotary_dim, compiled="triton")
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    # float32 arithmetic rounded once: float16 outputs are bit-equal to the formula's. bfloat16
    # within one unit in the last place: Triton's interpreter converts float32 -> bfloat16 by
    # truncation, where the compiled kernel (and the formula) round to nearest even. The
    # GPU fuses a*c - b*s into one FMA (one rounding fewer): float16 within one unit there.
    tol = {
        torch.float32: {"atol": 1e-6, "rtol": 1e-6},
        torch.float64: {"atol": 1e-12, "rtol": 1e-12},
        torch.float16: {"atol": 0, "rtol": 0} if device == "cpu" else {"atol": 0, "rtol": 2.0**-10},
        torch.bfloat16: {"atol": 0, "rtol": 2.0**-7},
    }[dtype]
    torch.testing.assert_close(qr, _reference(q, cos.to(exact), sin.to(exact), layout, rotary_dim), **tol)
    torch.testing.assert_close(kr, _reference(k, cos.to(exact), sin.to(exact), layout, rotary_dim), **tol)
    assert qr.dtype == dtype and qr.shape == q.shape


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_in_place_per_batch_tables_and_strided_input(device, layout):
    torch.manual_seed(1)
    # q as a transposed view of [b, s, h, d] (what a fused qkv projection gives): not contiguous
    q = torch.randn(2, 19, 4, 32, device=device).transpose(1, 2)
    k = torch.randn(2, 2, 19, 32, device=device)
    cos, sin = _tables(19, 16, batch=2, device=device)  # [b, s, r/2]: packed / left-padded positions
    want_q, want_k = _reference(q, cos, sin, layout, 32), _reference(k, cos, sin, layout, 32)
    q_in, k_in = q.clone(), k.clone()
    qr, kr = apply_rotary(q_in, k_in, cos.float(), sin.float(), layout=layout, inplace=True, compiled="triton")
    assert qr is q_in and kr is k_in
    torch.testing.assert_close(q_in, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_in, want_k, atol=1e-6, rtol=1e-6)


def test_more_key_heads_than_query_heads(device):
    """Programs run over max(h_q, h_kv) heads: k heads past q's still get their tables."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 2, 21, 16, device=device), torch.randn(2, 4, 21, 16, device=device)
    cos, sin = _tables(21, 8, device=device)
    qr, kr = apply_rotary(q, k, cos.float(), sin.float(), compiled="triton")
    torch.testing.assert_close(qr, _reference(q, cos, sin, "half", 16).float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kr, _reference(k, cos, sin, "half", 16).float(), atol=1e-6, rtol=1e-6)


def test_decode_step_with_key_tables(device):
    """KV-cache decoding: one query position, every key position, separate tables."""
    torch.manual_seed(2)
    q, k = torch.randn(1, 8, 1, 64, device=device), torch.randn(1, 2, 9, 64, device=device)
    cos_k, sin_k = _tables(9, 32, offset=0, device=device)
    cos_q, sin_q = cos_k[-1:], sin_k[-1:]
    qr, kr = apply_rotary(q, k, cos_q, sin_q, k_cos=cos_k, k_sin=sin_k, compiled="triton")
    torch.testing.assert_close(qr, _reference(q, cos_q, sin_q, "half", 64), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kr, _reference(k, cos_k, sin_k, "half", 64), atol=1e-6, rtol=1e-6)


def test_errors_name_the_problem(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    cos, sin = _tables(4, 4)
    with pytest.raises(ValueError, match="forward only"):
        apply_rotary(q, q.detach(), cos, sin, compiled="triton")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        apply_rotary(q.detach(), q.detach(), cos, sin, compiled="triton")
    with pytest.raises(ValueError, match="compiled must be"):
        apply_rotary(q.detach(), q.detach(), cos, sin, compiled="tritonn")


def test_auto_path_never_takes_triton(monkeypatch):
    """The kernel is opt-in: ``compiled="auto"`` keeps the other paths even under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    called = []
    monkeypatch.setattr(rope_triton, "kernel", lambda *a, **kw: called.append(1))
    q = torch.randn(1, 2, 4, 8)
    cos, sin = _tables(4, 4)
    apply_rotary(q, q.clone(), cos, sin)
    assert not called
    assert rope_fast.rope_triton is rope_triton


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel is checked on one")
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_compiled_kernel_on_gpu(layout):
    torch.manual_seed(3)
    q = torch.randn(1, 32, 2048, 128, device="cuda")
    k = torch.randn(1, 8, 2048, 128, device="cuda")
    cos, sin = _tables(2048, 64)
    cos, sin = cos.float().cuda(), sin.float().cuda()
    qr, kr = apply_rotary(q, k, cos, sin, layout=layout, compiled="triton")
    torch.testing.assert_close(qr, _reference(q, cos, sin, layout, 128), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kr, _reference(k, cos, sin, layout, 128), atol=1e-5, rtol=1e-5)
