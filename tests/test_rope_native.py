"""The native in-place kernel for the half layout (posenc.functional.rope_native):
against the float64 formula, bit for bit against the compiled path, every table shape,
strided inputs, several threads, the routing in ``apply_rotary`` and a missing compiler."""

from __future__ import annotations

import pytest
import torch
from test_rope_fast import reference, tables

from posenc.functional import rope_fast, rope_native
from posenc.functional.rope_fast import apply_rotary

needs_native = pytest.mark.skipif(not rope_native.available(), reason="no C compiler: the kernel cannot be built")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 6])
@pytest.mark.parametrize("table", ["shared", "per_batch", "batch_of_one"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_equals_formula_and_compiled_path(dtype, rotary_dim, table, threads):
    b, h, s, d = 2, 3, 70, 16  # 420 rows: split over threads at uneven bounds
    pos = torch.arange(s) if table != "per_batch" else torch.stack([torch.arange(s), torch.arange(5, 5 + s)])
    cos, sin = tables(pos, rotary_dim)  # [s, r/2] or [b, s, r/2]
    if table == "batch_of_one":
        cos, sin = cos[None], sin[None]  # [1, s, r/2]
    x = torch.randn(b, s, h, d).to(dtype).transpose(1, 2)  # [b, h, s, d], not contiguous
    want = reference(x, cos, sin, "half", rotary_dim)
    compiled, _ = apply_rotary(x.clone(), x.clone(), cos, sin, rotary_dim=rotary_dim, compiled=True)
    c, sn = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos, sin)  # as apply_rotary shapes them
    got = x.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = rope_native.kernel(got, c, sn, rotary_dim)
    finally:
        torch.set_num_threads(old)
    assert out is got
    assert torch.equal(got, compiled)  # float32 arithmetic, no FMA, rounded once: same bits
    t = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-2}
    torch.testing.assert_close(got.double(), want, **t)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])  # pass-through untouched


@needs_native
def test_bfloat16_special_values_equal_the_compiled_path():
    # halfway cases (round to nearest even), subnormals, huge values, inf and NaN: the
    # same bits as the compiled path (NaN/inf spread to the partner: inf * 0 = NaN).
    vals = [1.0, float("nan"), float("inf"), -3.0e38, 1.00390625, 2.0**-130, 7.0, -0.0]
    x = torch.tensor(vals * 4).to(torch.bfloat16).view(1, 1, 4, 8)
    cos, sin = tables(torch.tensor([0, 1, 7, 1000]), 8)
    compiled, _ = apply_rotary(x.clone(), x.clone(), cos, sin, compiled=True)
    got = rope_native.kernel(x.clone(), cos, sin, 8)
    assert torch.equal(got.isnan(), compiled.isnan())
    assert torch.equal(got[~got.isnan()], compiled[~compiled.isnan()])


@needs_native
def test_apply_rotary_routes_large_inplace_half_to_native(monkeypatch):
    calls = []
    real = rope_native.kernel
    monkeypatch.setattr(rope_native, "kernel", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    cos, sin = tables(torch.arange(8), 16)
    want_q = reference(q, cos, sin, "half", 16)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = apply_rotary(q_in, k_in, cos, sin, inplace=True)
    assert calls == [1, 1] and got_q is q_in and got_k is k_in
    torch.testing.assert_close(got_q.double(), want_q, rtol=1e-5, atol=1e-5)
    # autograd, float64, compiled=False or out of place: never the native kernel
    apply_rotary(q.clone().requires_grad_(), k.clone(), cos, sin)
    apply_rotary(q.double(), k.double(), cos, sin, inplace=True)
    apply_rotary(q.clone(), k.clone(), cos, sin, inplace=True, compiled=False)
    assert calls == [1, 1]


def test_missing_compiler_is_reported_and_warned_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached build to reuse
    monkeypatch.setattr(rope_native, "_state", {})
    monkeypatch.setattr(rope_fast, "_WARNED", [])
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    assert not rope_native.available()
    assert "no-such-cc" in rope_native.unavailable_reason()
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    cos, sin = tables(torch.arange(4), 8)
    want = reference(q, cos, sin, "half", 8)
    with pytest.warns(RuntimeWarning, match="native in-place rotary kernel could not be built .*no-such-cc"):
        got, _ = apply_rotary(q.clone(), k.clone(), cos, sin, inplace=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # another path, same result
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_rotary(q.clone(), k.clone(), cos, sin, inplace=True)  # warned once only
    with pytest.raises(RuntimeError, match="native rotary kernel is unavailable"):
        rope_native.kernel(q.clone(), cos, sin, 8)
