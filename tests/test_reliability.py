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


# The only (encoding, dtype) pairs allowed to refuse positions near 2**20, and the refusal
# they must give: integer's values (the positions themselves) exceed float16's 65,504.
REFUSED_AT_2_20 = {
    ("integer", torch.float16): r"integer encoding values reach 1\.049e\+06 at position 1048579, "
    r"beyond the range of torch\.float16 \(max 6\.55e\+04\); use float32/bfloat16",
}


@pytest.mark.parametrize("name", posenc.available())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_overflow_at_two_to_the_twenty(name, dtype):
    """Positions near 2**20: finite outputs, or — only for the pairs in ``REFUSED_AT_2_20``,
    where the dtype cannot hold the encoding's values — that exact error; never a silent
    inf/NaN, and never a refusal elsewhere."""
    if name == "binary":
        pe = create_example(name, dim=24)
    else:
        pe = build(name, max_len=2**20 + 8)
    positions = torch.arange(2**20 - 4, 2**20 + 4)
    x = torch.randn(1, 8, 24 if name == "binary" else DIM, dtype=dtype)
    attn = posenc.Attention(x.shape[-1], HEADS, pe=pe).to(dtype)
    pe.to(dtype)
    with torch.no_grad():
        if (name, dtype) in REFUSED_AT_2_20:
            with pytest.raises(ValueError, match=REFUSED_AT_2_20[name, dtype]):
                pe.embed(x, positions)
            CASES["overflow-refused"] += 1
            return
        h = pe.embed(x, positions)
        out = attn(h, positions)
        bias = None if pe.needs_content else pe.bias(positions, positions)  # content: covered by attn
    assert h.shape == x.shape and torch.isfinite(h).all()
    assert out.shape == x.shape and torch.isfinite(out).all()
    if bias is not None:
        assert not torch.isnan(bias).any()
    CASES["overflow"] += 1


BAD_VALUES = [0, -1, -2.5, 0.5, float("nan"), float("inf"), "x", None, True, [], 4096]

# The values of BAD_VALUES (by repr) that each parameter accepts; every other value of
# BAD_VALUES must be refused. A value newly accepted or newly refused fails the test.
ACCEPTED = {
    "alibi": {"num_heads": ["4096"], "causal": ["True"]},
    "binary": {"dim": ["4096"]},
    "cope": {"head_dim": ["4096"], "npos_max": ["4096"], "causal": ["True"]},
    "fire": {
        "num_heads": ["4096"],
        "mlp_width": ["4096"],
        "init_c": ["0.5", "4096"],
        "init_L": ["0.5", "4096"],
        "eps": ["0.5", "4096"],
    },
    "integer": {"dim": ["4096"]},
    "kerple": {"num_heads": ["4096"], "eps": ["0.5", "4096"]},
    "learned": {"dim": ["4096"], "max_len": ["4096"], "init_std": ["0", "0.5", "4096"]},
    "normalized": {"dim": ["4096"], "length": ["4096"], "causal": ["True"]},
    "proportional": {
        "head_dim": ["4096"],
        "partial_rotary_factor": ["0", "0.5", "None"],
        "base": ["None", "4096"],
        "factor": ["None", "4096"],
    },
    "rope": {
        "head_dim": ["4096"],
        "base": ["None", "4096"],
        "rotary_dim": ["None"],
        "partial_rotary_factor": ["0.5", "None"],
        "rope_type": ["None"],
        "factor": ["None"],
        "original_max_len": ["None"],
        "max_len": ["None", "4096"],
        "rope_parameters": ["None"],
    },
    "rope2d": {"head_dim": ["4096"], "grid_width": ["4096"], "base": ["4096"]},
    "sandwich": {"num_heads": ["4096"], "sin_dim": ["4096"]},
    "shaw": {"head_dim": ["4096"], "max_distance": ["0", "4096"]},
    "sine": {"min_period": ["4096"], "ratio": ["4096"]},
    "sinusoidal": {"dim": ["4096"], "base": ["4096"]},
    "t5": {"num_heads": ["4096"], "max_distance": ["4096"], "causal": ["True"]},
    "xpos": {"head_dim": ["4096"], "base": ["4096"], "scale_base": ["0.5", "4096"], "gamma": ["0.5", "4096"]},
}
WITHOUT_PARAMETERS = ["none"]


def _fields(name: str) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(posenc.get(name).Params)]


def test_the_parameter_table_covers_every_encoding():
    """Every registered encoding is in ACCEPTED (or has no parameters), with its real
    parameter names: a new encoding or a renamed parameter must be added here."""
    assert sorted([*ACCEPTED, *WITHOUT_PARAMETERS]) == posenc.available()
    for name in WITHOUT_PARAMETERS:
        assert _fields(name) == [], name
        with pytest.raises(TypeError, match=r"no parameter 'dim'"):
            posenc.create(name, dim=DIM)
    for name, accepted in ACCEPTED.items():
        assert set(accepted) <= set(_fields(name)), name


def _forward_is_finite(pe: posenc.PositionalEncoding, fields: list[str]) -> torch.Tensor:
    """Run a built encoding: through ``Attention`` at the test's width, or, when a size
    parameter makes that width unusable (``num_heads=4096``, ``head_dim=4096``), through
    its ``rotate``/``bias`` hooks on q/k of the encoding's own shape. Returns the output."""
    p = pe.params
    positions = torch.arange(6)
    if "dim" in fields:  # additive: the width is the encoding's
        width, heads, head_dim = p.dim, HEADS, p.dim // HEADS
    else:
        width = DIM
        heads, head_dim = getattr(p, "num_heads", HEADS), getattr(p, "head_dim", DIM // HEADS)
    with torch.no_grad():
        if heads * head_dim == width:
            attn = posenc.Attention(width, heads, pe=pe)
            out = attn(pe.embed(torch.randn(1, 6, width), positions), positions)
            assert out.shape == (1, 6, width)
            CASES["valid-param"] += 1
            return out
        q, k, v = torch.randn(3, 1, heads, 6, head_dim).unbind(0)
        q2, k2 = pe.rotate(q, k, positions, positions)
        assert q2.shape == q.shape and k2.shape == k.shape
        bias = pe.bias(positions, positions, q=q2, k=k2)
        mask = torch.ones(6, 6, dtype=torch.bool).tril()
        scores = torch.zeros(6, 6).masked_fill(~mask, float("-inf"))
        if bias is not None:
            assert bias.shape[-3:] == (heads, 6, 6)
            scores = scores + bias
        out = torch.nn.functional.scaled_dot_product_attention(q2, k2, v, attn_mask=scores)
        CASES["valid-param-hooks"] += 1
        return out


@pytest.mark.parametrize("name", sorted(ACCEPTED))
@settings(
    max_examples=int(os.environ.get("POSENC_FUZZ_EXAMPLES", 30)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_generated_parameter_values_build_or_name_the_parameter(name, data):
    """Any value for any parameter: a value in ``ACCEPTED`` builds and runs finitely (no
    error of any kind is allowed); any other is refused with a ValueError/TypeError whose
    message names the parameter."""
    fields = _fields(name)
    field = data.draw(st.sampled_from(fields))
    value = data.draw(st.sampled_from(BAD_VALUES))
    dims = dict(dim=DIM, num_heads=HEADS, head_dim=DIM // HEADS, max_len=64, causal=True)
    params = {**posenc.get(name).example_params, field: value}
    if repr(value) not in ACCEPTED[name].get(field, []):
        with pytest.raises((ValueError, TypeError), match=rf"\b{field}\b"):
            posenc.registry.create_for_model(name, params, **dims)
        CASES["invalid-param"] += 1
        return
    pe = posenc.registry.create_for_model(name, params, **dims)
    assert getattr(pe.params, field) == value or repr(value) in ("nan", "None") or field in dims, (field, value)
    out = _forward_is_finite(pe, fields)
    assert torch.isfinite(out).all(), f"{name}.{field}={value!r} gave non-finite output"
