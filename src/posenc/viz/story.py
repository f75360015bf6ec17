"""The report's story, steps 1-6: order blindness, then each family of encodings with
its measured flaw and the one or two figures that show it (``FIGURE_SIGNALS`` decides
which figures apply to an encoding's position signal). Step 7, what breaks past the
trained length, and the report card are in ``posenc.viz.story_past``.

Every number in a caption comes from a measurement handed over (report cards, the
sentence test, the tiny models' losses) or made here through ``posenc.analysis``.
"""

from __future__ import annotations

import itertools
from typing import Any

import posenc
from posenc import analysis
from posenc.analysis.order import SentenceOrder
from posenc.viz import curves, figures, story_figures
from posenc.viz.figures import TrainedAttention, applies, signal_of
from posenc.viz.items import Items, PretrainedSection

fmt = analysis.format_value

#: Final loss on the copied half below which a tiny copy model counts as learned
#: (uniform over the 16 tokens already seen: ln 16 = 2.77).
LEARNED_LOSS = 0.5
#: Where the first trained length of the story's "what happens past it" figure ends.
PAST_TRAINED = 251

#: The story's order of the shipped encodings and their section (plugins: by family).
ORDER = (
    "none",
    "integer",
    "normalized",
    "binary",
    "sine",
    "sinusoidal",
    "learned",
    "shaw",
    "t5",
    "alibi",
    "kerple",
    "fire",
    "sandwich",
    "cope",
    "rope",
    "proportional",
    "xpos",
    "rope2d",
)
SECTION_OF = {"shaw": "relative", "t5": "relative"}
FAMILY_SECTION = {"none": "blind", "additive": "absolute", "relative": "relative", "bias": "alibi"}
FAMILY_SECTION.update({"contextual": "alibi", "rotary": "rope"})

#: The figures each encoding's step shows, in order (filtered by ``figures.applies``);
#: an encoding not listed shows the first of ``DEFAULT_KINDS`` that applies.
STORY_KINDS = {
    "integer": ("heatmap",),
    "normalized": ("heatmap",),
    "binary": ("heatmap",),
    "sine": ("similarity",),
    "sinusoidal": ("past", "similarity"),
    "learned": ("heatmap",),
    "shaw": ("buckets",),
    "t5": ("buckets", "bias"),
    "cope": ("bias",),
    "rope": ("rotation", "decay"),
    "proportional": ("wavelengths",),
    "xpos": ("decay",),
    "rope2d": ("heatmap",),
}
DEFAULT_KINDS = ("buckets", "bias", "rotation", "similarity", "heatmap")

SECTIONS = {
    "blind": ("1 · Attention is blind to order", ""),
    "absolute": (
        "2 · Absolute positions: integer → normalized → binary → sine → sinusoidal → learned",
        "Add a vector PE(p) to the token at position p. Each attempt fixes the previous one's flaw and brings "
        "its own; the curves and figures below measure each flaw.",
    ),
    "relative": (
        "3 · Relative positions: Shaw and T5's buckets",
        "Give the score a term that depends on the distance m − n only. Shaw et al. (2018) learn one vector per "
        "distance clipped at K; T5 shares one scalar bias per log-spaced bucket. Both stop seeing distance past "
        "a point: the buckets saturate.",
    ),
    "alibi": (
        "4 · ALiBi and its relatives: a bias on distance",
        "ALiBi adds −slope·distance to each score: no parameters and no saturation, but a fixed preference "
        "for recent tokens. KERPLE, FIRE and Sandwich change the shape of that bias; CoPE counts positions "
        "by content.",
    ),
    "rope": (
        "5 · RoPE: rotating queries and keys",
        "Rotate each plane of q and k by position × its own frequency: q·k then depends on m − n only. "
        "The planes turn at very different speeds, and the slow ones are what a longer context stresses.",
    ),
    "scaling": (
        "6 · RoPE scaling rules",
        "To run RoPE past its trained context, the rules rescale the frequencies (posenc.rope_frequencies, "
        "equal to transformers').",
    ),
}


def story_order(cards: list[analysis.ReportCard]) -> list[analysis.ReportCard]:
    """``cards`` in the story's order (``ORDER``, then the others by name)."""
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(cards, key=lambda c: (rank.get(c.name, len(ORDER)), c.name))


def section_of(name: str, family: str) -> str:
    return SECTION_OF.get(name, FAMILY_SECTION.get(family, "rope"))


def story_kinds(card: analysis.ReportCard) -> list[str]:
    """The figure kinds of ``card``'s step: its ``STORY_KINDS`` (or the first default)
    that apply to its signal (``FIGURE_SIGNALS``)."""
    signal = signal_of(card.kind, card.beyond.saturation)
    wanted = [k for k in STORY_KINDS.get(card.name, ()) if applies(k, signal)]
    return wanted or [k for k in DEFAULT_KINDS if applies(k, signal)][:1]


def measured(card: analysis.ReportCard) -> str:
    """The card's numbers that bear on the encoding's flaw, as one sentence."""
    row = card.row()
    keys = {
        "vector": ("|PE|/|tok|", "len. change", "max/med step", "period", "past L"),
        "rotation": ("rel. dev.", "len. change", "past L"),
        "bias": ("rel. dev.", "max/med step", "past L"),
    }.get(card.kind, ("blind", "blind causal"))
    parts = [f"{k} {fmt(row[k])}" for k in keys if row[k] is not None]
    return f"Measured (report card, L = {card.config.train_length}): " + "; ".join(parts) + "."


def _caption(kind: str, card: analysis.ReportCard) -> str:
    """What to notice in figure ``kind`` of ``card``'s encoding."""
    n, c = card.name, card
    specific = {
        ("heatmap", "integer"): f"Every dimension holds the index itself: the colour only grows, to "
        f"{fmt(c.magnitude.max_ratio)}× a token's norm within {c.config.horizon} positions.",
        ("heatmap", "normalized"): "p / (n − 1) in every dimension at one length n; the curve above shows the "
        f"same position at other lengths (its vector moves by up to {fmt(c.length.max_change)}).",
        ("heatmap", "binary"): "One bit per row: the fastest flips every position, the slowest once; at 127 → 128 "
        f"eight bits flip at once (the largest step is {fmt(c.continuity.ratio)}× the median).",
        ("heatmap", "learned"): "An untrained table is random: a learned table gets its structure from training "
        "only, and has no row past max_len (past L: error). A trained one is in the next figure.",
        ("similarity", "sinusoidal"): "Similarity depends (almost) only on m − n: bands parallel to the diagonal; "
        f"no two positions within {c.config.horizon} coincide (closest pair {fmt(c.uniqueness.min_distance)} apart).",
        ("decay", "rope"): "RoFormer's bound decays with distance; the mean |q·k| of random q, k does not "
        f"(Barbero et al. 2024): at distance {len(c.profile.distances) - 1} the bound is "
        f"{_last(c.profile.bound)} of its start, the mean |q·k| {_ratio(c.profile.mean_abs_score)}.",
    }
    generic = {
        "heatmap": f"{n}'s position signal (rows: dimensions, or heads for a bias; columns: positions). "
        "Notice how a column differs from its neighbours'.",
        "similarity": "Cosine similarity of every pair of positions: a bright band along the diagonal means "
        "neighbours are alike, bright lines off it mean repeats.",
        "bias": f"The bias {n} adds to the score of query m on key n, per head: notice how it changes with the "
        "distance m − n and whether it stops changing.",
        "buckets": f"Left: pairs (m, n) of one colour share one bias. Right: the bucket against distance; past "
        f"distance {c.beyond.saturation} every distance gets the same bias (measured: the signals stop changing).",
        "rotation": "Three planes of one query rotated to positions 0..23: the fastest plane turns several times, "
        "the slowest barely moves.",
        "decay": f"{n}: RoFormer's bound against the scores of random q, k, relative to distance 0.",
        "wavelengths": "Planes above the line never complete a turn within the context: their angles past it "
        "were never trained.",
    }
    return specific.get((kind, n), generic.get(kind, f"{kind} of {n}"))


def _last(t: Any) -> str:
    return "–" if t is None else fmt(float(t[-1]))


def _ratio(t: Any) -> str:
    return fmt(float(t[-1] / t[0])) if t is not None and float(t[0]) else "–"


def _draw(items: Items, kind: str, card: analysis.ReportCard) -> None:
    n, c, cap = card.name, card, _caption(kind, card)
    small = {"dim": 4, "num_heads": 1} if n == "sine" else {"dim": 32, "num_heads": 2}
    opts = " --dim 4 --heads 1" if n == "sine" else " --dim 32 --heads 2"
    if kind == "past":
        past = analysis.beyond(analysis.build(n, dim=32, num_heads=2, max_len=384), PAST_TRAINED, 384)
        if past.unseen_distance is not None:
            d = past.unseen_distance
            cap = (
                f"Trained on positions 0..{PAST_TRAINED - 1} (dashed line): everything right of it was never seen. "
                f"Position {PAST_TRAINED} lies {fmt(float(d[0]))}× the median step from its nearest trained vector, "
                f"position 383 {fmt(float(d[-1]))}×: new vectors, close but never trained on."
            )
        items.figure(cap, lambda: story_figures.past_length(n, train_length=PAST_TRAINED), wide=True, tag=f"{n}:past")
    elif kind == "similarity" and n == "sine":
        period = analysis.uniqueness(analysis.build(n, dim=4, num_heads=1, max_len=128), 128).period
        cap = f"At 4 dimensions sine repeats every {period} positions (measured): positions {period} apart collide."
        items.figure(
            cap, lambda: figures.similarity(n, **small), f"posenc plot {n} --kind similarity{opts}", tag=f"{n}:{kind}"
        )
    elif kind in ("heatmap", "similarity"):
        make = figures.heatmap if kind == "heatmap" else figures.similarity
        items.figure(cap, lambda: make(n, **small), f"posenc plot {n} --kind {kind}{opts}", tag=f"{n}:{kind}")
    else:
        # bias figures in the form the card measured (t5, alibi, cope: causal by default)
        kw = {"causal": c.causal} if kind in ("bias", "buckets") else {}
        wide = kind in ("bias", "buckets", "rotation")
        command = None if kw.get("causal") else f"posenc plot {n} --kind {kind}"  # the CLI draws it bidirectional
        items.figure(cap, lambda: figures.KINDS[kind](n, **kw), command, wide=wide, tag=f"{n}:{kind}")


def attention_item(items: Items, maps: TrainedAttention, *, blindness: bool = False) -> None:
    """Attention maps only of a model that learned; ``blindness``: draw a model that did
    not learn too (labelled), since it shows what a blind model does."""
    learned = maps.loss < LEARNED_LOSS
    what = f"a tiny causal LM (2 layers × 4 heads) after {maps.steps} steps on copy [x1..x16, x1..x16]"
    if learned:
        cap = (
            f"{maps.encoding}: {what}; loss {maps.loss:.3g} < {LEARNED_LOSS} (learned). Notice the diagonal "
            "16 positions back: the copy head."
        )
    else:
        cap = (
            f"{maps.encoding}: {what}; loss {maps.loss:.3g} ≥ {LEARNED_LOSS}: did not learn (uniform over the 16 "
            "tokens seen: 2.77)."
        )
        if not blindness:
            items.note(f"{maps.encoding}: no attention map", cap + " Maps of a model that did not learn say nothing.")
            return
        cap += " Without positions no head can find the token 16 back: attention stays spread out."
    command = f"posenc plot {maps.encoding} --kind attention"
    items.figure(cap, lambda: figures.copy_attention(maps), command, wide=True, tag=f"{maps.encoding}:attention")


def blind_section(
    cards: list[analysis.ReportCard], sentences: list[SentenceOrder], attention: dict[str, TrainedAttention], ids: Any
) -> Items:
    items = Items(ids)
    items.text(
        "Self-attention mixes tokens by content alone: permute the tokens and every output is permuted the same "
        "way. Without a position signal a model cannot tell “I go home” from “home go I”."
    )
    if sentences:
        parts = [
            f"{t.encoding} {'with a causal mask' if t.causal else 'without a mask'}: "
            f"{'the same outputs' if t.same else 'different outputs'} (deviation {t.deviation:.2g})"
            for t in sentences
        ]
        items.figure(
            f"“{sentences[0].sentence}” and “{sentences[0].permuted_sentence}” through the reference Transformer "
            "(2 layers, dim 16, random weights; each word's two rows side by side). " + "; ".join(parts) + ". "
            "Notice the equal row pairs in the first panel: a causal mask already leaks order (a token sees only "
            "its prefix), and so does any position signal.",
            lambda: story_figures.sentence_order(sentences),
            wide=True,
            tag=f"{sentences[0].encoding}:blindness",
        )
    rows = [[c.name, c.family, f"{c.order.deviation:.2g}", f"{c.order_causal.deviation:.2g}"] for c in cards]
    blind = [c.name for c in cards if c.order.blind] or ["none"]
    items.table(
        "The permutation test (analysis.order_blindness): one attention layer, 16 random tokens rolled by one, "
        "max |A(Px) − P A(x)| / max |A(x)| (0: blind). Blind without a mask: " + ", ".join(blind) + ".",
        ["encoding", "family", "deviation, no mask", "deviation, causal"],
        rows,
    )
    if "none" in attention:
        attention_item(items, attention["none"], blindness=True)
    return items


def story_sections(
    cards: list[analysis.ReportCard],
    *,
    sentences: list[SentenceOrder],
    attention: dict[str, TrainedAttention],
    pretrained: PretrainedSection | None,
    ids: itertools.count,
) -> list[dict[str, Any]]:
    """Steps 1-6 as report sections ``{"anchor", "title", "items"}``, in story order."""
    styles = curves.Styles([*ORDER, *(c.name for c in cards)])
    ordered = story_order(cards)
    by_section: dict[str, list[analysis.ReportCard]] = {}
    for c in ordered:
        by_section.setdefault(section_of(c.name, c.family), []).append(c)
    out = [
        {
            "anchor": "blind",
            "title": SECTIONS["blind"][0],
            "items": blind_section(ordered, sentences, attention, ids).items,
        }
    ]
    for key in ("absolute", "relative", "alibi", "rope"):
        members = by_section.get(key, [])
        if not members:
            continue
        items = Items(ids)
        items.text(SECTIONS[key][1])
        plots = _curves(key, members, ordered, styles)
        for c in members:
            enc = posenc.get(c.name)
            items.heading(c.name, f"({c.family}) {enc.reference}")
            items.text(f"{enc.formula}. Flaw: {enc.flaw}. {measured(c)}")
            for caption, fig in plots.get(c.name, []):
                items.plot(caption, fig)
            for kind in story_kinds(c):
                _draw(items, kind, c)
            if c.name in attention:
                attention_item(items, attention[c.name])
            if c.name == "learned" and pretrained is not None:
                pretrained_items(items, pretrained)
        out.append({"anchor": key, "title": SECTIONS[key][0], "items": items.items})
    if any(c.kind == "rotation" for c in cards):
        items = Items(ids)
        items.text(SECTIONS["scaling"][1])
        items.figure(
            "Frequency ratio of each plane under each rule at factor 8: linear (PI) divides every frequency by 8; "
            "dynamic NTK raises the base; YaRN and Llama 3 keep the fast planes and interpolate only the slow ones.",
            figures.scaling,
            "posenc plot rope --kind scaling",
        )
        out.append({"anchor": "scaling", "title": SECTIONS["scaling"][0], "items": items.items})
    return out


def _curves(key: str, members: list[analysis.ReportCard], cards: list, styles: curves.Styles) -> dict[str, list]:
    """The section's interactive curves, by the encoding whose step they follow: the one
    that shows the flaw most (largest magnitude, largest jump, a length-dependent one)."""
    out: dict[str, list] = {}
    vec = [c for c in members if c.kind == "vector"]
    if key == "absolute" and vec:
        top = max(vec, key=lambda c: c.magnitude.max_ratio)
        low = min(vec, key=lambda c: c.magnitude.max_ratio)
        out.setdefault(top.name, []).append(
            (
                f"Log scale: the ratios span {fmt(low.magnitude.max_ratio)} ({low.name}) to "
                f"{fmt(top.magnitude.max_ratio)} ({top.name}) at their largest. Notice {top.name} crossing the token "
                "norm and drowning the token; the bounded encodings stay below it. Click a legend entry to hide it.",
                curves.magnitude(vec, styles),
            )
        )
        for c in [c for c in vec if c.length.vector_change > 1e-6][:1]:
            out.setdefault(c.name, []).append(
                (
                    f"{c.name}: the same position p gets another value at every sequence length n (largest change "
                    f"measured: {fmt(c.length.max_change)}).",
                    curves.lengths(c.name, c.family, styles(c.name)),
                )
            )
        finite = [c for c in vec if c.continuity.ratio < float("inf")]
        jumpy = max(finite or vec, key=lambda c: c.continuity.ratio)
        out.setdefault(jumpy.name, []).append(
            (
                f"Each step over the encoding's median step (1: every step alike). Notice {jumpy.name}'s spikes: "
                f"its largest step is {fmt(jumpy.continuity.ratio)}× its median.",
                curves.steps(vec, styles),
            )
        )
    elif key == "alibi" and members:
        out[members[0].name] = [
            (
                "The bias of a query r positions after the key, for every bias encoding (relative to distance 0). "
                "Notice the straight lines that never saturate against T5's and Shaw's flat tails past their last "
                "bucket.",
                curves.profile(cards, styles, "bias"),
            )
        ]
    elif key == "rope" and members:
        out[members[0].name] = [
            (
                "Mean |q·k| of random contents (solid) and RoFormer's bound (dotted) against distance, relative to "
                "distance 0: the bound decays, the scores of random q, k do not.",
                curves.profile(cards, styles, "rotation"),
            )
        ]
    return out


def pretrained_items(items: Items, section: PretrainedSection) -> None:
    """A learned table of a local transformers model (default all-MiniLM-L6-v2)."""
    info, label = section.info, section.label
    items.heading(f"a trained table: {label}", f"({info.model_type})")
    if section.card is None:
        items.text(f"{label} uses {info.kind} positions: {info.rope_parameters or info.extra}.")
        return
    row = section.card.row()
    items.text(
        f"{label} learns {info.table.shape[0]} absolute position vectors of width {info.table.shape[1]} "
        f"({info.tensor_name}). {measured(section.card)}"
    )
    items.figure(
        f"{label}'s learned positions: norms against its mean token norm, and the cosine similarity of every pair. "
        f"Notice position 0's outsized norm (|PE|/|tok| {fmt(row['|PE|/|tok|'])}) and the bright diagonal: "
        "training made neighbours alike.",
        lambda: story_figures.pretrained(info, name=label),
        section.command,
        wide=True,
    )
