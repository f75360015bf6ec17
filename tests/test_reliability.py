"""Tier 4 and numerics, parametrized over the whole registry and driven by hypothesis.

Valid calls return finite outputs of the right shape and dtype; invalid calls raise
``ValueError``/``TypeError`` naming the argument. The number of generated cases is
counted in ``CASES`` and printed at the end of the session (see docs/reliability.md).
"""

import collections
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import posenc
from posenc.registry import create_example

CASES: collections.Counter = collections.Counter()
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DIM, HEADS = 16, 4


def build(name: str, *, causal: bool = True, max_len: int = 4096) -> posenc.PositionalEncoding:
    return create_example(name, dim=DIM, num_heads=HEADS, head_dim=DIM // HEADS, max_len=max_len, causal=causal)


@st.composite
def layouts(draw):
    """(b, s, positions) with positions [s] or [b, s], sorted, possibly offset."""
    b = draw(st.integers(1, 3))
    s = draw(st.integers(1, 10))
    offset = draw(st.integers(0, 2000))
    batched = draw(st.booleans())
    if batched:
        starts = torch.tensor(draw(st.lists(st.integers(0, offset), min_size=b, max_size=b)))
        positions = starts[:, None] + torch.arange(s)  # [b, s]
    else:
        positions = offset + torch.arange(s)  # [s]
    return b, s, positions


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nreliability cases tried:", dict(CASES), "total", sum(CASES.values()))


@pytest.mark.parametrize("name", posenc.available())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), dtype=st.sampled_from(DTYPES), causal=st.booleans())
def test_valid_calls_are_finite_with_right_shape_and_dtype(name, layout, dtype, causal):
    b, s, positions = layout
    pe = build(name, causal=causal)
    attn = posenc.Attention(DIM, HEADS, num_kv_heads=2, pe=pe, causal=causal).to(dtype)
    x = torch.randn(b, s, DIM, dtype=dtype)
    with torch.no_grad():
        h = pe.embed(x, positions)
        out = attn(h, positions)
    assert h.shape == x.shape and h.dtype == dtype
    assert out.shape == (b, s, DIM) and out.dtype == dtype
    assert torch.isfinite(out).all()
    CASES["valid"] += 1


BAD_POSITIONS = [
    (torch.arange(4.0), TypeError, "positions must have an integer dtype"),
    (torch.tensor([0, -1, 2, 3]), ValueError, "positions must be non-negative"),
    (torch.zeros(1, 1, 4, dtype=torch.long), ValueError, r"positions must have shape \[s\] or \[b, s\]"),
    (torch.arange(3), ValueError, "positions has length 3 but the input has 4 tokens"),
    (torch.zeros(5, 4, dtype=torch.long), ValueError, "positions has batch size 5"),
    ([0, 1, 2, 3], TypeError, "positions must be a torch.Tensor"),
    (torch.ones(4, dtype=torch.bool), TypeError, "positions must have an integer dtype"),
]


@pytest.mark.parametrize("name", posenc.available())
@pytest.mark.parametrize("bad, exc, match", BAD_POSITIONS)
def test_bad_positions_raise_a_named_error(name, bad, exc, match):
    pe = build(name)
    attn = posenc.Attention(DIM, HEADS, pe=pe)
    x = torch.randn(2, 4, DIM)
    with pytest.raises(exc, match=match):
        attn(pe.embed(x, bad) if pe.family == "additive" else x, bad)
    CASES["invalid"] += 1


@pytest.mark.parametrize("name", posenc.available())
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2), (torch.float32, 1e-5)])
def test_low_precision_matches_float64_reference(name, dtype, tol):
    """Attention output in ``dtype`` against the same weights in float64.

    Tolerance is on the error relative to the output's RMS: float16 1e-2, bfloat16
    6e-2 (8 mantissa bits), float32 1e-5.
    """
    torch.manual_seed(1)
    pe = build(name)
    attn = posenc.Attention(DIM, HEADS, num_kv_heads=2, pe=pe).double()
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    positions = torch.arange(100, 112)
    if pe.family == "additive":
        x = x / x.norm(dim=-1, keepdim=True) * 4  # keep integer/normalized inputs in range
    with torch.no_grad():
        ref = attn(pe.embed(x, positions), positions)
        low = attn.to(dtype)(pe.to(dtype).embed(x.to(dtype), positions), positions)
    err = (low.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert err < tol, f"{name} {dtype}: relative RMS error {err:.3g} >= {tol}"
    CASES["numerics"] += 1


@pytest.mark.parametrize("name", posenc.available())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_overflow_at_two_to_the_twenty(name, dtype):
    """Positions near 2**20: finite outputs, or a clear error where the dtype cannot
    hold the encoding's values (integer in float16) — never a silent inf/NaN."""
    if name == "binary":
        pe = create_example(name, dim=24)
    else:
        pe = build(name, max_len=2**20 + 8)
    positions = torch.arange(2**20 - 4, 2**20 + 4)
    x = torch.randn(1, 8, 24 if name == "binary" else DIM, dtype=dtype)
    attn = posenc.Attention(x.shape[-1], HEADS, pe=pe).to(dtype)
    pe.to(dtype)
    with torch.no_grad():
        try:
            h = pe.embed(x, positions)
        except ValueError as err:
            assert "beyond the range of" in str(err)
            CASES["overflow-refused"] += 1
            return
        out = attn(h, positions)
        bias = None if pe.needs_content else pe.bias(positions, positions)  # content: covered by attn
    assert torch.isfinite(out).all()
    if bias is not None:
        assert not torch.isnan(bias).any()
    CASES["overflow"] += 1


BAD_VALUES = [0, -1, -2.5, 0.5, float("nan"), float("inf"), "x", None, True, [], 4096]


@pytest.mark.parametrize("name", posenc.available())
@settings(max_examples=int(os.environ.get("POSENC_FUZZ_EXAMPLES", 30)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_generated_parameter_values_build_or_name_the_parameter(name, data):
    """Any value for any parameter: the encoding builds and runs finitely, or the error
    is a ValueError/TypeError that names the parameter — never another exception."""
    import dataclasses

    fields = [f.name for f in dataclasses.fields(posenc.get(name).Params)]
    if not fields:
        return
    field = data.draw(st.sampled_from(fields))
    value = data.draw(st.sampled_from(BAD_VALUES))
    dims = dict(dim=DIM, num_heads=HEADS, head_dim=DIM // HEADS, max_len=64, causal=True)
    params = {**posenc.get(name).example_params, field: value}
    try:
        pe = posenc.registry.create_for_model(name, params, **dims)
    except (ValueError, TypeError) as err:
        assert field in str(err), f"{name}.{field}={value!r}: message does not name it: {err}"
        CASES["invalid-param"] += 1
        return
    # The value was valid: a forward must be finite (or refuse with a named error).
    width = pe.params.dim if "dim" in fields else DIM
    heads = getattr(pe.params, "num_heads", HEADS)
    head_dim = getattr(pe.params, "head_dim", width // heads)
    if width % heads or width // heads != head_dim:
        CASES["valid-param-unusable-size"] += 1
        return
    attn = posenc.Attention(width, heads, pe=pe)
    positions = torch.arange(6)
    with torch.no_grad():
        try:
            out = attn(pe.embed(torch.randn(1, 6, width), positions), positions)
        except (ValueError, TypeError) as err:
            CASES["valid-param-refused-input"] += 1
            assert str(err)
            return
    assert torch.isfinite(out).all(), f"{name}.{field}={value!r} gave non-finite output"
    CASES["valid-param"] += 1
