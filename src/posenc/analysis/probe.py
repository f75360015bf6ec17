"""Probing any registered encoding through its hooks only (``embed``/``table``,
``rotate``, ``bias``): no measurement here knows which encoding it holds.

Shapes:
    B  number of random content draws    h  heads    d  head_dim
    dim = h * d model width               s  positions probed

The *signature* of a position is the one vector that carries its position signal,
chosen by which hooks the encoding overrides:

* additive (``table``): the position vector ``PE(p)`` ``[dim]``;
* rotary (``rotate``): a fixed unit query rotated to position ``p``, all heads ``[h * d]``;
* bias (``bias``): the bias of query ``p`` on key ``0`` (distance ``p``), all heads ``[h]``;
* none: a zero vector (nothing depends on position).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from einops import rearrange

from posenc.base import PositionalEncoding
from posenc.functional.checks import positive_int
from posenc.registry import create_for_model, get

SIGNATURE_KINDS = ("vector", "rotation", "bias", "none")


@dataclasses.dataclass(frozen=True)
class Probe:
    """An encoding built at analysis sizes, with the sizes it was built for."""

    name: str
    pe: PositionalEncoding
    dim: int
    num_heads: int
    causal: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def family(self) -> str:
        return type(self.pe).family

    @property
    def kind(self) -> str:
        """Which hook carries the position signal: one of ``SIGNATURE_KINDS``."""
        return signature_kind(self.pe)


def overrides(pe: PositionalEncoding, hook: str) -> bool:
    """True when ``pe``'s class overrides ``hook`` of the base contract."""
    return getattr(type(pe), hook) is not getattr(PositionalEncoding, hook)


def signature_kind(pe: PositionalEncoding) -> str:
    if hasattr(pe, "table") and overrides(pe, "embed"):
        return "vector"
    if overrides(pe, "rotate"):
        return "rotation"
    if overrides(pe, "bias"):
        return "bias"
    return "none"


def _randomize_constant_tables(pe: PositionalEncoding, seed: int) -> None:
    """Give constant-initialized tables (e.g. a zero bucket embedding) seeded N(0, 1)
    values, so an untrained encoding still shows its structure (which positions share a
    parameter). Scalars and vectors (slopes, KERPLE's r1/r2) are never touched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pe.parameters():
            if param.dim() >= 2 and param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param))


def build(
    name: str,
    *,
    dim: int = 64,
    num_heads: int = 4,
    max_len: int | None = None,
    causal: bool = False,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> Probe:
    """Build encoding ``name`` through ``posenc.registry.create_for_model`` so that the
    size parameters it declares (``dim``, ``num_heads``, ``head_dim``, ``max_len``,
    ``causal``) are filled; the encoding's ``example_params`` and then ``params``
    override them. A non-causal build takes only the example values of required
    parameters (rope2d's grid width) and leaves optional ones at their defaults:
    ``normalized`` is then the classic definition (``length=None``, each row by its own
    last index), and with ``causal=True`` its example ``length`` (the causal definition).
    Seeded, in eval mode."""
    positive_int("dim", dim)
    positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    cls = get(name)  # unknown names list the valid ones
    torch.manual_seed(seed)
    example = dict(getattr(cls, "example_params", {}))
    if not causal:  # optional example values (normalized's length) only where a causal build needs them
        fields = dataclasses.fields(cls.Params)
        required = {f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING}
        example = {k: v for k, v in example.items() if k in required}
    merged = {**example, **(params or {})}
    pe = create_for_model(
        name, merged, dim=dim, num_heads=num_heads, head_dim=dim // num_heads, max_len=max_len, causal=causal
    )
    _randomize_constant_tables(pe, seed)
    return Probe(name=name, pe=pe.eval(), dim=dim, num_heads=num_heads, causal=causal)


def _positions(x: torch.Tensor | range | list | int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long()
    if isinstance(x, int):
        return torch.arange(x)
    return torch.tensor(list(x), dtype=torch.long)


@torch.no_grad()
def scores(
    probe: Probe,
    q_content: torch.Tensor,
    k_content: torch.Tensor,
    q_positions,
    k_positions,
) -> torch.Tensor:
    """Attention scores of constant content at the given positions, through every hook.

    Each query token carries ``q_content`` and each key token ``k_content`` (identity
    projections): ``x = embed(content, positions)``, split into heads, rotated, then
    ``q kᵀ / sqrt(d) + bias``.

    Args:
        q_content, k_content: ``[B, dim]`` content vectors (one draw per row).
        q_positions, k_positions: ``[s_q]`` / ``[s_k]`` int positions (or ints = arange).

    Returns:
        ``[B, h, s_q, s_k]`` float32 scores (masked entries of a causal bias stay -inf).
    """
    pe, h = probe.pe, probe.num_heads
    qp, kp = _positions(q_positions), _positions(k_positions)
    if q_content.shape != k_content.shape or q_content.dim() != 2 or q_content.shape[1] != probe.dim:
        raise ValueError(
            f"q_content and k_content must both be [B, {probe.dim}], got {tuple(q_content.shape)} "
            f"and {tuple(k_content.shape)}"
        )
    B = q_content.shape[0]
    xq = pe.embed(q_content[:, None, :].expand(B, len(qp), probe.dim).contiguous(), qp)  # [B, s_q, dim]
    xk = pe.embed(k_content[:, None, :].expand(B, len(kp), probe.dim).contiguous(), kp)  # [B, s_k, dim]
    q = rearrange(xq, "b s (h d) -> b h s d", h=h)
    k = rearrange(xk, "b s (h d) -> b h s d", h=h)
    q, k = pe.rotate(q, k, qp, kp)
    # float64 product: a float32 GEMM may round differently for different s (seen on AMD
    # EPYC: 1.8e-7), which length_dependence would report as a dependence on the length.
    out = q.double() @ k.double().transpose(-1, -2) / math.sqrt(probe.head_dim)  # [B, h, s_q, s_k]
    bias = pe.bias(qp, kp, q=q, k=k)
    if bias is not None:
        out = out + bias.to(out.dtype)  # [h|B, h, s_q, s_k] broadcasts
    return out.float()


def fixed_query(probe: Probe, seed: int = 0) -> torch.Tensor:
    """A seeded random unit-norm query per head, ``[1, h, 1, d]``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, probe.num_heads, 1, probe.head_dim, generator=gen)
    return q / q.norm(dim=-1, keepdim=True)


@torch.no_grad()
def signature(probe: Probe, positions) -> torch.Tensor:
    """The position signal of each position (see the module docstring), ``[s, F]``
    float32. Raises what the encoding raises for positions it does not support."""
    pos = _positions(positions)
    pe, kind = probe.pe, probe.kind
    if kind == "vector":
        return pe.table(pos).float()  # [s, dim]
    if kind == "rotation":
        q = fixed_query(probe).expand(1, probe.num_heads, len(pos), probe.head_dim).contiguous()  # [1, h, s, d]
        k = q[:, :, :1]  # [1, h, 1, d]
        q_rot, _ = pe.rotate(q, k, pos, pos[:1])
        return rearrange(q_rot[0], "h s d -> s (h d)").float()
    if kind == "bias":
        top = int(pos.max()) + 1 if pos.numel() else 1
        return rearrange(bias_matrix(probe, top)[:, pos, 0], "h s -> s h")  # bias of query p on key 0
    return torch.zeros(len(pos), 1)


def supported_length(probe: Probe, upto: int) -> int:
    """The largest ``n <= upto`` whose positions ``0..n-1`` the encoding accepts (a
    learned table stops at ``max_len``, binary at ``2**dim``): ``signature`` raises
    ``ValueError`` beyond it."""
    try:
        signature(probe, upto)
        return upto
    except ValueError:
        pass
    lo, hi = 0, upto  # signature(lo) works (or lo = 0), signature(hi) raises
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            signature(probe, mid)
            lo = mid
        except ValueError:
            hi = mid
    return lo


@torch.no_grad()
def bias_matrix(probe: Probe, length: int, content_seed: int = 1) -> torch.Tensor:
    """``pe.bias`` over ``arange(length)`` queries and keys, ``[h, s, s]`` float32.

    Content-dependent encodings (Shaw, CoPE) read ``q``/``k`` of one seeded random
    content vector repeated at every position. ``None`` biases give zeros.
    """
    pe, h = probe.pe, probe.num_heads
    pos = torch.arange(length)
    gen = torch.Generator().manual_seed(content_seed)
    content = torch.randn(1, probe.dim, generator=gen)
    x = pe.embed(content[:, None, :].expand(1, length, probe.dim).contiguous(), pos)  # [1, s, dim]
    q = rearrange(x, "b s (h d) -> b h s d", h=h)
    q, k = pe.rotate(q, q, pos, pos)
    bias = pe.bias(pos, pos, q=q, k=k)
    if bias is None:
        return torch.zeros(h, length, length)
    return (bias[0] if bias.dim() == 4 else bias).float()  # [h, s, s]


@torch.no_grad()
def rotation_pairs(probe: Probe, position: int = 1) -> list[tuple[int, int, float, float]]:
    """Recover the 2-D rotation planes of a rotary encoding from ``rotate`` alone.

    Rotating the identity basis at ``position`` gives the linear map ``R``; each
    dimension's partner is the other coordinate its basis vector moves into. Works for
    any layout (half/NeoX, interleaved/GPT-J) and partial rotary.

    Returns:
        ``(i, j, angle, gain)`` per plane of head 0, sorted by decreasing angle: the
        angle (radians) and the norm gain of one step at ``position``; dimensions that
        do not rotate come last with ``j = -1``.
    """
    d = probe.head_dim
    eye = torch.eye(d)[:, None, None, :].expand(d, probe.num_heads, 1, d).contiguous()  # [d, h, 1, d]
    pos = torch.tensor([position])
    q_rot, _ = probe.pe.rotate(eye, eye, pos, pos)
    R = q_rot[:, 0, 0, :].double()  # row j: R e_j  [d, d]
    seen: set[int] = set()
    pairs: list[tuple[int, int, float, float]] = []
    for i in range(d):
        if i in seen:
            continue
        row = R[i].clone()
        row[i] = 0.0
        j = int(row.abs().argmax())
        if row[j].abs() < 1e-9 or j in seen:
            seen.add(i)
            pairs.append((i, -1, 0.0, float(R[i, i].abs())))
            continue
        seen.update((i, j))
        gain = float(torch.hypot(R[i, i], R[i, j]))
        # R e_i = gain * (cos a e_i + sin a e_j) up to the encoding's sign convention.
        angle = abs(math.atan2(float(R[i, j]), float(R[i, i])))
        pairs.append((i, j, angle, gain))
    return sorted(pairs, key=lambda t: (t[1] < 0, -t[2]))
