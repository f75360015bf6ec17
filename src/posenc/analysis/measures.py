"""The claims of the classic story as numbers, for any encoding (see ``probe``).

Each function takes a :class:`~posenc.analysis.probe.Probe` and returns a frozen
dataclass; tensors in them are float64 CPU tensors indexed by position or distance.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from einops import rearrange

from posenc.analysis.probe import Probe, rotation_pairs, scores, signature
from posenc.attention import Attention
from posenc.functional.checks import positive_float, positive_int


def _median_step(sig: torch.Tensor) -> float:
    steps = (sig[1:] - sig[:-1]).norm(dim=-1)
    return float(steps.median()) if steps.numel() else 0.0


# -- magnitude ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Magnitude:
    """‖signature(p)‖ for p in ``0..horizon-1``.

    ``token_norm`` is the norm of a typical token embedding (unit-variance entries:
    ``token_std * sqrt(dim)``); ``ratio = norms / token_norm`` says whether the position
    drowns the token (only meaningful for additive encodings, ``kind == "vector"``).
    """

    kind: str
    norms: torch.Tensor  # [horizon]
    token_norm: float
    growth: float  # (norms[-1] - norms[0]) / (horizon - 1): slope of a linear growth

    @property
    def ratio(self) -> torch.Tensor:
        return self.norms / self.token_norm

    @property
    def max_ratio(self) -> float:
        return float(self.ratio.max())


def magnitude(
    probe: Probe, horizon: int = 256, *, token_std: float = 1.0, token_norm: float | None = None
) -> Magnitude:
    """Norm of each position's signature against a typical token-embedding norm."""
    positive_int("horizon", horizon)
    positive_float("token_std", token_std)
    sig = signature(probe, horizon).double()
    norms = sig.norm(dim=-1)
    tn = token_norm if token_norm is not None else token_std * math.sqrt(probe.dim)
    positive_float("token_norm", tn)
    growth = float(norms[-1] - norms[0]) / max(horizon - 1, 1)
    return Magnitude(kind=probe.kind, norms=norms, token_norm=float(tn), growth=growth)


# -- length dependence ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LengthDependence:
    """Largest change of a position's vector (``vector_change``) and of the attention
    scores between two positions (``score_change``) when only the sequence length
    changes, over positions present in every length. 0 means length-independent."""

    lengths: tuple[int, ...]
    vector_change: float
    score_change: float

    @property
    def max_change(self) -> float:
        return max(self.vector_change, self.score_change)


def length_dependence(probe: Probe, lengths: tuple[int, ...] = (16, 32, 64, 128), *, seed: int = 0) -> LengthDependence:
    """Compare each length's signatures and scores with those of the longest length on
    the common prefix ``0..min(lengths)-1``."""
    if len(lengths) < 2:
        raise ValueError(f"lengths needs at least two sequence lengths, got {lengths!r}")
    for n in lengths:
        positive_int("lengths", n)
    lengths = tuple(sorted(set(lengths)))
    common = lengths[0]
    gen = torch.Generator().manual_seed(seed)
    content = torch.randn(2, probe.dim, generator=gen)
    ref_len = lengths[-1]
    ref_sig = signature(probe, ref_len)[:common].double()
    ref_sc = scores(probe, content, content.flip(0), ref_len, ref_len)[..., :common, :common].double()
    vec, sco = 0.0, 0.0
    for n in lengths[:-1]:
        sig = signature(probe, n)[:common].double()
        vec = max(vec, float((sig - ref_sig).norm(dim=-1).max()))
        sc = scores(probe, content, content.flip(0), n, n)[..., :common, :common].double()
        finite = torch.isfinite(sc) & torch.isfinite(ref_sc)
        if not torch.equal(torch.isfinite(sc), torch.isfinite(ref_sc)):
            sco = math.inf
        elif finite.any():
            sco = max(sco, float((sc - ref_sc)[finite].abs().max()))
    return LengthDependence(lengths=lengths, vector_change=vec, score_change=sco)


# -- continuity -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Continuity:
    """Steps ‖sig(p+1) − sig(p)‖; ``ratio = max_step / median_step`` (1 = every step
    equal; large = jumps; ``inf`` = piecewise constant with jumps)."""

    steps: torch.Tensor  # [horizon - 1]
    max_step: float
    median_step: float
    argmax: int  # the step p -> p+1 with the largest jump

    @property
    def ratio(self) -> float:
        if self.max_step == 0.0:
            return 1.0
        return self.max_step / self.median_step if self.median_step > 0 else math.inf


def continuity(probe: Probe, horizon: int = 256) -> Continuity:
    if positive_int("horizon", horizon) < 3:
        raise ValueError(f"horizon must be >= 3, got {horizon}")
    sig = signature(probe, horizon).double()
    steps = (sig[1:] - sig[:-1]).norm(dim=-1)  # [horizon - 1]
    return Continuity(
        steps=steps, max_step=float(steps.max()), median_step=float(steps.median()), argmax=int(steps.argmax())
    )


# -- uniqueness -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Uniqueness:
    """Smallest distance between the signatures of two different positions within
    ``horizon`` (0 = a collision), the pair that attains it, and the smallest period
    ``P`` with ``sig(p + P) = sig(p)`` for every p (``None`` when nothing repeats)."""

    horizon: int
    min_distance: float
    pair: tuple[int, int]
    period: int | None
    scale: float  # the median step, to read min_distance against

    @property
    def unique(self) -> bool:
        return self.min_distance > 1e-6 * max(self.scale, 1e-12)


def uniqueness(probe: Probe, horizon: int = 256, *, rtol: float = 1e-5) -> Uniqueness:
    if positive_int("horizon", horizon) < 2:
        raise ValueError(f"horizon must be >= 2, got {horizon}")
    sig = signature(probe, horizon).double()
    # Exact differences (no matmul shortcut): repeats must come out as 0, not 1e-7.
    dist = torch.cdist(sig, sig, compute_mode="donot_use_mm_for_euclid_dist")  # [H, H]
    tol = rtol * max(float(sig.norm(dim=-1).max()), 1e-12)
    period = None
    for p in range(1, horizon):
        # sig(i + p) = sig(i) for every i: the p-th diagonal of the distance matrix is 0.
        if float(torch.diagonal(dist, offset=p).max()) <= tol:
            period = p
            break
    dist.fill_diagonal_(math.inf)
    flat = int(dist.argmin())
    i, j = divmod(flat, horizon)
    return Uniqueness(
        horizon=horizon,
        min_distance=float(dist[i, j]),
        pair=(min(i, j), max(i, j)),
        period=period,
        scale=_median_step(sig),
    )


# -- relative-ness --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Relativeness:
    """How far scores depend on anything but ``m − n``, for content fixed per draw.

    For each draw, head and offset ``m − n``, the spread (max − min) of the scores along
    that diagonal; ``deviation`` is the largest spread divided by the spread of the
    whole score matrix (0: purely relative, ~1: absolute). Position-free scores give 0.
    """

    length: int
    deviation: float
    score_range: float


def relativeness(probe: Probe, length: int = 48, *, draws: int = 4, seed: int = 0) -> Relativeness:
    if positive_int("length", length) < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    positive_int("draws", draws)
    gen = torch.Generator().manual_seed(seed)
    qc = torch.randn(draws, probe.dim, generator=gen)
    kc = torch.randn(draws, probe.dim, generator=gen)
    sc = scores(probe, qc, kc, length, length).double()  # [B, h, s, s]
    finite = torch.isfinite(sc)
    vals = torch.where(finite, sc, torch.nan)
    flat = rearrange(vals, "b h s t -> b h (s t)")
    total = float((flat.nan_to_num(-math.inf).amax(-1) - flat.nan_to_num(math.inf).amin(-1)).max())
    worst = 0.0
    for off in range(-(length - 1), length):
        diag_f = torch.diagonal(finite, offset=off, dim1=-2, dim2=-1)  # [B, h, n]
        if not (diag_f.all(-1) | ~diag_f.any(-1)).all():
            return Relativeness(length=length, deviation=math.inf, score_range=total)
        diag = torch.diagonal(vals, offset=off, dim1=-2, dim2=-1)
        if diag_f.any():
            spread = diag.nan_to_num(-math.inf).amax(-1) - diag.nan_to_num(math.inf).amin(-1)
            worst = max(worst, float(spread[diag_f.all(-1)].max()))
    deviation = 0.0 if total <= 1e-12 else worst / total
    return Relativeness(length=length, deviation=deviation, score_range=total)


# -- distance profile -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistanceProfile:
    """Scores against distance ``r = m − n`` (query at ``r``, key at 0).

    ``mean_score``: mean q·k of iid N(0, 1) contents (Barbero et al. 2024: flat for
    RoPE). ``mean_abs_score``: the mean of its absolute value. ``ones_score``: the score
    of the all-ones content, the RoFormer picture. ``bound``: for rotary encodings the
    RoFormer (Su et al. 2021, section 3.4.3) relative upper bound
    ``(1/(d/2)) Σ_j |Σ_{k<j} e^{i r θ_k}|`` divided by its value at r = 0 (decays).
    """

    distances: torch.Tensor  # [R]
    mean_score: torch.Tensor
    mean_abs_score: torch.Tensor
    ones_score: torch.Tensor
    bound: torch.Tensor | None


def roformer_bound(thetas: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """RoFormer's long-term-decay bound ``(1/(d/2)) Σ_{j=1}^{d/2} |S_j(r)|`` with
    ``S_j(r) = Σ_{k=0}^{j-1} e^{i r θ_k}`` (θ sorted decreasing), normalized to 1 at
    ``r = 0``. Shapes: thetas ``[d/2]``, distances ``[R]`` -> ``[R]``."""
    th = thetas.double().sort(descending=True).values
    phase = distances.double()[:, None] * th[None, :]  # [R, d/2]
    S = torch.cumsum(torch.polar(torch.ones_like(phase), phase), dim=-1)  # [R, d/2]
    bound = S.abs().mean(-1)
    return bound / bound[0] if bound[0] > 0 else bound


def distance_profile(probe: Probe, max_distance: int = 256, *, draws: int = 256, seed: int = 0) -> DistanceProfile:
    positive_int("max_distance", max_distance)
    positive_int("draws", draws)
    gen = torch.Generator().manual_seed(seed)
    qc = torch.randn(draws, probe.dim, generator=gen)
    kc = torch.randn(draws, probe.dim, generator=gen)
    sc = scores(probe, qc, kc, max_distance, [0])[..., 0].double()  # [B, h, R]
    ones = torch.ones(1, probe.dim)
    so = scores(probe, ones, ones, max_distance, [0])[0, :, :, 0].double()  # [h, R]
    distances = torch.arange(max_distance)
    bound = None
    if probe.kind == "rotation":
        thetas = torch.tensor([a for _, j, a, _ in rotation_pairs(probe) if j >= 0], dtype=torch.float64)
        if thetas.numel():
            bound = roformer_bound(thetas, distances)
    return DistanceProfile(
        distances=distances,
        mean_score=sc.mean(dim=(0, 1)),
        mean_abs_score=sc.abs().mean(dim=(0, 1)),
        ones_score=so.mean(0),
        bound=bound,
    )


# -- beyond the trained length --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Beyond:
    """What happens past the trained length ``train_length``.

    ``error``: the message when the encoding refuses positions ``>= train_length``
    (learned). ``unseen_distance``: for each new position, the distance of its signature
    to the nearest signature seen in training, divided by the median training step
    (0 = nothing new; saturated or periodic). ``distinct``: number of distinct signatures
    among positions/distances ``0..D`` for each D; ``saturation`` is the D from which the
    count stops growing up to the horizon (``None`` while it still grows at the end).
    """

    train_length: int
    horizon: int
    error: str | None
    unseen_distance: torch.Tensor | None  # [horizon - train_length]
    distinct: torch.Tensor | None  # [horizon]
    saturation: int | None

    @property
    def max_unseen(self) -> float | None:
        return None if self.unseen_distance is None else float(self.unseen_distance.max())


def distinct_counts(sig: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """``counts[D]`` = number of distinct rows among ``sig[0..D]`` (float tolerance:
    rows are rounded to ``rtol`` times the largest absolute entry). ``[s]`` int64."""
    scale = max(float(sig.abs().max()), 1e-12) if sig.numel() else 1.0
    keys = torch.round(sig.double() / (rtol * scale)).long()
    seen: set[tuple[int, ...]] = set()
    counts = []
    for row in keys.tolist():
        seen.add(tuple(row))
        counts.append(len(seen))
    return torch.tensor(counts)


def beyond(probe: Probe, train_length: int = 128, horizon: int = 512) -> Beyond:
    positive_int("train_length", train_length)
    if positive_int("horizon", horizon) <= train_length:
        raise ValueError(f"horizon must be > train_length={train_length}, got {horizon}")
    seen = signature(probe, train_length).double()
    try:
        sig = signature(probe, horizon).double()
    except ValueError as err:
        counts = distinct_counts(seen)
        return Beyond(train_length, horizon, str(err), None, counts, None)
    new = sig[train_length:]
    step = _median_step(seen)
    nearest = torch.cdist(new, seen).amin(dim=-1)  # [horizon - train_length]
    unseen = nearest / step if step > 0 else torch.where(nearest > 0, math.inf, 0.0)
    counts = distinct_counts(sig)
    final = int(counts[-1])
    first = int((counts == final).nonzero()[0])
    saturation = first if first < horizon - 1 else None
    return Beyond(train_length, horizon, None, unseen, counts, saturation)


# -- order blindness ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OrderBlindness:
    """``deviation``: max |A(P x) − P A(x)| / max |A(x)| for a token permutation P of a
    random input through ``posenc.Attention`` (after ``embed``). 0 = the layer is
    blind to order (permutation-equivariant)."""

    causal: bool
    deviation: float

    @property
    def blind(self) -> bool:
        return self.deviation < 1e-5


@torch.no_grad()
def order_blindness(probe: Probe, length: int = 16, *, seed: int = 0) -> OrderBlindness:
    if positive_int("length", length) < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    torch.manual_seed(seed)
    attn = Attention(probe.dim, probe.num_heads, pe=probe.pe, causal=probe.causal).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, probe.dim, generator=gen)  # [1, s, dim]
    perm = torch.roll(torch.arange(length), 1)  # a permutation that moves every token
    pos = torch.arange(length)
    out = attn(probe.pe.embed(x, pos), pos)
    out_perm = attn(probe.pe.embed(x[:, perm], pos), pos)
    dev = float((out_perm - out[:, perm]).abs().max() / out.abs().max().clamp_min(1e-30))
    return OrderBlindness(causal=probe.causal, deviation=dev)
