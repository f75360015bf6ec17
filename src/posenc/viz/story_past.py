"""The report's step 7, what breaks past the trained length (the report cards' ``past L``,
a study's conclusions, tables and curves, the paper comparisons, a context-extension
section), and the report card with its legend."""

from __future__ import annotations

import itertools
from typing import Any

import posenc
from posenc import analysis
from posenc.viz import curves
from posenc.viz.items import Items, StudyResults

fmt = analysis.format_value


def past_sentences(cards: list[analysis.ReportCard]) -> list[str]:
    """The report cards' ``past L`` column in sentences, grouped by what happens."""
    if not cards:
        return []
    L = cards[0].config.train_length
    errors = [c.name for c in cards if c.kind != "none" and c.beyond.error is not None]
    sat = [(c.name, c.beyond.saturation) for c in cards if c.kind != "none" and c.beyond.saturation is not None]
    new = [(c.name, c.beyond.max_unseen) for c in cards if c.kind != "none" and c.beyond.max_unseen]
    out = []
    if errors:
        out.append(f"Refuse positions past their table ({L} rows here): {', '.join(errors)}.")
    if sat:
        out.append(
            "Saturate (no new signal past a distance, so far tokens look alike): "
            + ", ".join(f"{n} at {s}" for n, s in sat)
            + "."
        )
    if new:
        far = sorted(new, key=lambda x: -x[1])
        out.append(
            f"Bring signals never seen in training (past L = {L}), this many median steps from every trained one: "
            + ", ".join(f"{n} {fmt(v)}" for n, v in far)
            + "."
        )
    return out


def study_items(items: Items, study: StudyResults, styles: curves.Styles) -> None:
    items.heading("The study: train short, test long", f"({len(study.runs)} finished runs from {study.source})")
    for sentence in study.conclusions:
        items.text(sentence)
    families = {n: posenc.get(n).family for n in posenc.available()}
    for t in study.tables:
        ppl = (t.metric or "").startswith("ppl")
        note = " Perplexity on a log scale: it spans decades once a model breaks." if ppl else ""
        items.plot(
            f"{t.task}: {t.metric} against evaluation length (log axis, labelled at powers of two and the trained "
            f"length, dashed); error bars: std over seeds. Notice where each line leaves its value at L.{note} "
            "Legend groups are families: click a family's title to hide it.",
            curves.study_curve(t, styles, families),
        )
        items.table(t.title, t.columns, t.rows, cls="study-table")
    if study.published:
        items.heading("Beside the published findings", "(experiments.published)")
        for t in study.published:
            items.table(t.title, t.columns, t.rows, cls="study-table")
    runs = [
        [
            r["run_id"],
            r["task"],
            r["encoding"],
            str(r["seed"]),
            str(r["train_length"]),
            f"{float(r.get('wall_time_s', float('nan'))):.1f}",
            str(r.get("git_commit", ""))[:10],
            str(r.get("torch_version", "")),
        ]
        for r in study.runs
    ]
    cols = ["run", "task", "encoding", "seed", "train length", "wall time (s)", "git commit", "torch"]
    items.table("Runs", cols, runs, cls="study-table", collapsed=True)


def past_section(
    cards: list[analysis.ReportCard],
    *,
    study: StudyResults | None,
    extras: list[dict[str, Any]],
    styles: curves.Styles,
    ids: itertools.count,
) -> dict[str, Any]:
    items = Items(ids)
    items.text(
        "A model sees positions 0..L−1 in training. Past L each encoding does one of three things, measured "
        "below: it refuses, it saturates, or it brings signals the model never saw."
    )
    for s in past_sentences(cards):
        items.text(s)
    items.plot(
        "Distinct signals among positions (distances, for a bias) 0..D: a flat curve means no new signal past "
        "that distance (saturation); the diagonal means every position is new.",
        curves.distinct(cards, styles),
    )
    items.plot(
        "How far each position past L is from the nearest trained one, in median steps between trained neighbours. "
        "Clipped at 10 (linear axis): integer's distance grows to hundreds and would flatten every other line; "
        "the curves that leave the plot at the top are beyond 10.",
        curves.unseen(cards, styles),
    )
    if study is not None:
        study_items(items, study, styles)
    else:
        items.note(
            "No study given",
            "the study's results (train short, test long) appear here with `posenc report --study RUN_DIR`, "
            "and in the report `posenc study` / `make run` writes.",
        )
    for extra in extras:
        items.heading(extra["title"])
        items.text(extra["text"])
        for t in extra["tables"]:
            items.table(t["caption"], t["columns"], t["rows"], cls="study-table")
        items.extend(extra["items"])
    return {"anchor": "past", "title": "7 · What breaks past the trained length", "items": items.items}


def card_section(cards: list[analysis.ReportCard], ids: itertools.count) -> dict[str, Any]:
    items = Items(ids)
    items.text(
        "Every claim of the story, measured for every encoding through its hooks only (posenc.analysis; "
        f"dim {cards[0].config.dim}, {cards[0].config.num_heads} heads, horizon {cards[0].config.horizon}, "
        f"trained length L = {cards[0].config.train_length})."
        if cards
        else ""
    )
    columns = list(cards[0].row()) if cards else []
    rows = [[fmt(v) for v in c.row().values()] for c in cards]
    items.table("The report card", columns, rows, legend=dict(analysis.CARD_COLUMNS), id="card-table")
    formulas = [[c.name, c.family, posenc.get(c.name).formula, posenc.get(c.name).flaw] for c in cards]
    items.table("Formulas and known flaws", ["encoding", "family", "formula", "flaw"], formulas, code_column=2)
    return {"anchor": "card", "title": "8 · The report card", "items": items.items}
