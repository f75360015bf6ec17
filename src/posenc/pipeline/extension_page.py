"""docs/extension.md from the committed records (``docs/data/extension.json``, the
``extension.json`` of ``posenc extend``): its generated blocks and quoted numbers.

The page holds two kinds of generated text, both rewritten by ``render_page`` and
checked by ``tests/test_extension_doc.py`` (any difference fails):

* blocks, between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` lines
  (``BLOCKS``: the protocol, the interpolation ratios, the provenance, the tables, the
  orderings, the figures);
* quotes in prose, ``<!--q KIND ARGS-->value<!--/q-->`` (``quote``): a number of the
  records named by what produced it, e.g. ``<!--q cell shakespeare ppl yarn
  fine-tuned-covering 256-->`` (the pooled value and its 95% interval). A quote whose value is ``{{?}}``
  is a sentence waiting for its records.

Regenerate the page (and its figures, ``docs/img/extension_<task>.png``) after
replacing the records::

    python -c "from posenc.pipeline.extension_page import write_extension_page; write_extension_page()"
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posenc.experiments.config import config_from_dict
from posenc.experiments.extend_claims import claim_cell, ordering_tables, orderings, ratio_interval
from posenc.experiments.extend_rules import base_rope, has_factor, rule_parameters
from posenc.experiments.extend_summary import (
    KEEP_BAR,
    extension_tables,
    factors_at,
    interval,
    past_factor_tables,
    read_extension,
    runs_by_stage,
    task_names,
)
from posenc.experiments.intervals import fmt_interval
from posenc.experiments.summary import TableData, to_markdown
from posenc.functional.rope_scaling import rope_frequencies
from posenc.pipeline.extension import curves
from posenc.viz.extension import plot_task
from posenc.viz.study import safe_filename

ROOT = Path(__file__).resolve().parents[3]
RECORDS = ROOT / "docs" / "data" / "extension.json"
PAGE = ROOT / "docs" / "extension.md"
BLOCKS = ("provenance", "protocol", "ratios", "tables", "past-factor", "orderings", "figures")
PLACEHOLDER = "{{?}}"
BLOCK = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)
QUOTE = re.compile(r"<!--q ([^>]*)-->([^<]*)<!--/q-->")  # a value never holds "<"


def _base_config(data: dict[str, Any], task: str):
    run_id = next(r["run_id"] for r in data["records"] if r["task"] == task and r["stage"] == "zero-shot")
    return config_from_dict(data["runs"][run_id]["config"])


def _ft_config(data: dict[str, Any], task: str):
    run_id = next((r["run_id"] for r in data["records"] if r["task"] == task and r["stage"] == "fine-tuned"), None)
    return None if run_id is None else config_from_dict(data["runs"][run_id]["config"])


def _first_metric(data: dict[str, Any], task: str) -> dict[str, Any]:
    return next(r for r in data["records"] if r["task"] == task)["metrics"][0]


def protocol_table(data: dict[str, Any]) -> TableData:
    """The protocol as the records state it: per task, the model, the base training,
    ``C``, the test set, the factors and the fine-tune (from each run's config)."""
    tasks = task_names(data)
    rows: dict[str, list[str]] = {}
    for task in tasks:
        cfg, ft = _base_config(data, task), _ft_config(data, task)
        m, t, tr = cfg.model, cfg.task, cfg.train
        _, hf, rotary = base_rope(cfg)
        first = _first_metric(data, task)
        C = next(r["context"] for r in data["records"] if r["task"] == task)
        layers = f"{m.num_layers} layer{'s' * (m.num_layers != 1)}"
        trained = f"L = {t.train_length}" if t.is_lm else f"n = 1..{t.train_length} of {t.num_symbols} symbols"
        by_length = factors_at(data, task, "zero-shot")
        cells = {
            "model": f"{layers}, dim {m.dim}, {m.num_heads} heads (head_dim {m.dim // m.num_heads}, "
            f"{rotary // 2} rotary pairs), RoPE base {hf.get('rope_theta', 10000.0):g}",
            "base training": f"{trained}, {tr.steps} steps, batch {tr.batch_size}, lr {tr.lr:g}, warm-up {tr.warmup}",
            "trained context C": f"{C} positions",
            "test set": (
                f"{first['tokens']} scored characters in {len(first['nll_segments'])} held-out segments, the same "
                f"at every length; non-overlapping windows and a sliding window of stride "
                f"{t.stride if t.stride is not None else 'E/4 at length E'}"
                if t.is_lm
                else f"{first['samples']} examples per length, answers scored with teacher forcing"
            ),
            "zero-shot factor by length": ", ".join(f"{n}: {s}" for n, s in by_length.items()),
        }
        if ft is not None:
            f = data["finetune"]["factor"]
            cells["fine-tune"] = (
                f"{ft.train.steps} steps at {ft.task.train_length} with factor {f}, batch {ft.train.batch_size}, "
                f"lr {ft.train.lr:g}, warm-up {ft.train.warmup}, from the base weights"
            )
            covering = factors_at(data, task, "fine-tuned-covering")
            cells["fine-tuned factor by length"] = f"{f} at every length; covering the length: " + ", ".join(
                f"{n}: {s}" for n, s in covering.items()
            )
        cells["seeds"] = ", ".join(str(s) for s in sorted({r["seed"] for r in data["records"] if r["task"] == task}))
        for name, value in cells.items():
            rows.setdefault(name, []).append(value)
    return TableData("Protocol (from the records' run configs)", ["", *tasks], [[k, *v] for k, v in rows.items()])


def ratios_table(data: dict[str, Any]) -> TableData:
    """Per task, each rule's interpolation ratio ``inv_freq_default / inv_freq_rule`` per
    rotary pair (pair 0 = highest frequency) at the fine-tune's factor and length ``f C``,
    from ``posenc.rope_frequencies``; YaRN's attention factor (cos and sin times it)."""
    f = data["finetune"]["factor"] if data["finetune"] else max(data["factors"])
    rules = [r for r in data["rules"] if has_factor(r)]
    rows = []
    for task in task_names(data):
        cfg = _base_config(data, task)
        _, hf, rotary = base_rope(cfg)
        C = next(r["context"] for r in data["records"] if r["task"] == task)
        theta = hf.get("rope_theta", 10000.0)
        default = rope_frequencies(rotary, {"rope_theta": theta})[0]
        row = [f"{task} (C = {C})"]
        for rule in rules:
            params = rule_parameters(rule, f, C, rotary_dim=rotary, rope_theta=theta)
            inv, att = rope_frequencies(rotary, params, max_position_embeddings=C, seq_len=f * C)
            cell = " ".join(f"{x:.3g}" for x in (default / inv).tolist())
            row.append(cell + (f" (× {att:.3f})" if att != 1.0 else ""))
        rows.append(row)
    title = f"Interpolation ratio per rotary pair at factor {f} and length {f}C (attention factor in brackets)"
    return TableData(title, ["task", *rules], rows)


def provenance(data: dict[str, Any], records: str = "docs/data/extension.json") -> str:
    """The records' provenance as a list: file, command, commit, environment, runs."""
    roles: dict[str, list[float]] = {}
    for run in data["runs"].values():
        roles.setdefault(run["role"], []).append(run["wall_time_s"] or 0.0)
    runs = ", ".join(f"{len(v)} {k} runs ({sum(v) / 60:.1f} min of training)" for k, v in roles.items())
    steps = sorted({str(run["train_step"]) for run in data["runs"].values()})
    return "\n".join(
        [
            f"- records: `{records}` (`extension.json` of `posenc extend`, format {data['format']})",
            f"- command: `{data['command']}`",
            f"- scored at commit `{data['git_commit']}` with torch {data['torch_version']}, CPU capability "
            f"{data['cpu_capability']}, Python {data['python_version']}, {data['threads']} thread(s)",
            f"- {runs}; training step: {', '.join(steps)}",
        ]
    )


def _seeds(data: dict[str, Any], task: str, rule: str, stage: str, *, only_kept: bool = True) -> dict[int, dict]:
    runs = runs_by_stage(data, task, only_kept=only_kept)
    if (rule, stage) not in runs:
        raise ValueError(f"no records of {rule!r} {stage!r} on {task!r}")
    return runs[(rule, stage)]


def quote(data: dict[str, Any], spec: str) -> str:
    """The text of the quote ``spec`` (``KIND ARGS``) from the records (only the seeds
    that kept the task, ``extend_summary.kept``):

    * ``cell TASK KEY RULE STAGE LENGTH``: the pooled value and its 95% interval (the
      tables' format, ``extend_summary.interval``);
    * ``mean TASK KEY RULE STAGE LENGTH``: the pooled value;
    * ``ratio TASK KEY RULE STAGE LENGTH``: ``KEY(LENGTH) / KEY(L)`` pooled, with its
      paired interval (``extend_claims.ratio_interval``);
    * ``claim TASK KEY N LENGTH``: claim ``N``'s cell of the ordering table;
    * ``verdict TASK KEY N LENGTH``: its verdict (agrees, disagrees, undecided, not judged);
    * ``holds TASK KEY N LENGTH``: the seeds where claim ``N`` holds, ``k/n`` (and the ties);
    * ``kept TASK RULE STAGE``: the seeds whose record kept the task, ``k of n``;
    * ``at TASK KEY RULE STAGE LENGTH SEED``: one seed's value, kept or not (three decimals);
    * ``bar``: the exact match at ``L`` a synthetic record needs to count (``KEEP_BAR``);
    * ``meta FIELD``: a top-level field (``git_commit``, ``torch_version``, ...);
    * ``seeds TASK``: the number of seeds.
    """
    kind, *args = spec.split()
    try:
        if kind in ("cell", "mean", "ratio"):
            task, key, rule, stage, n = args
            if kind == "ratio":
                return fmt_interval(ratio_interval(data, task, key, rule, stage, int(n)))
            recs = list(_seeds(data, task, rule, stage).values())
            cell = interval(recs, key, int(n))
            return fmt_interval(cell) if kind == "cell" else f"{cell[0]:.2f}"
        if kind in ("claim", "holds", "verdict"):
            task, key, number, n = args
            found = [c for c in orderings(data, task, key) if c["number"] == int(number) and c["length"] == int(n)]
            if not found:
                raise ValueError(f"claim {number} is not checked at length {n}")
            c = found[0]
            if kind == "claim":
                return claim_cell(c)
            if kind == "verdict":
                return c["verdict"]
            return f"{c['holds']}/{c['seeds']}" + (f", {c['ties']} tied" if c["ties"] else "")
        if kind == "kept":
            task, rule, stage = args
            kept, every = _seeds(data, task, rule, stage), _seeds(data, task, rule, stage, only_kept=False)
            return f"{len(kept)} of {len(every)}"
        if kind == "at":
            task, key, rule, stage, n, seed = args
            every = _seeds(data, task, rule, stage, only_kept=False)
            if int(seed) not in every:
                raise ValueError(f"no seed {seed} of {rule!r} {stage!r} on {task!r}")
            return f"{next(m[key] for m in every[int(seed)]['metrics'] if m['length'] == int(n)):.3f}"
        if kind == "bar" and not args:
            return f"{KEEP_BAR:g}"
        if kind == "meta":
            (field,) = args
            return str(data[field])
        if kind == "seeds":
            (task,) = args
            return str(len({r["seed"] for r in data["records"] if r["task"] == task}))
    except (ValueError, KeyError, StopIteration) as err:
        raise ValueError(f"quote {spec!r}: {err}") from None
    kinds = "cell, mean, ratio, claim, verdict, holds, kept, at, bar, meta, seeds"
    raise ValueError(f"quote {spec!r}: unknown kind {kind!r} ({kinds})")


def page_blocks(data: dict[str, Any], img: str = "img") -> dict[str, str]:
    """The text of every generated block (``BLOCKS``); ``img``: the figures' folder,
    relative to the page."""
    figures = [f"![{t}]({img}/extension_{safe_filename(t)}.png)" for t in task_names(data)]
    return {
        "provenance": provenance(data),
        "protocol": to_markdown([protocol_table(data)]),
        "ratios": to_markdown([ratios_table(data)]),
        "tables": to_markdown(extension_tables(data)),
        "past-factor": to_markdown(past_factor_tables(data)),
        "orderings": to_markdown(ordering_tables(data)),
        "figures": "\n\n".join(figures) + "\n",
    }


def fill_page(page: str, blocks: dict[str, str], quoted: Callable[[str], str]) -> str:
    """``page`` with the text of every generated block (``BLOCK``) taken from ``blocks``
    and every quote (``QUOTE``) from ``quoted(spec)``: the one way the generated pages
    (docs/extension.md, docs/mechanisms.md, docs/results.md) are rewritten. A
    ``ValueError`` names a block that is missing, repeated or not in ``blocks``."""
    found = [m.group(2) for m in BLOCK.finditer(page)]
    if sorted(found) != sorted(blocks):
        raise ValueError(f"the page's generated blocks are {found}; it needs each of {list(blocks)} once")
    page = BLOCK.sub(lambda m: m.group(1) + blocks[m.group(2)].rstrip("\n") + "\n" + m.group(4), page)
    return QUOTE.sub(lambda m: f"<!--q {m.group(1)}-->{quoted(m.group(1))}<!--/q-->", page)


def render_page(page: str, data: dict[str, Any]) -> str:
    """``page`` with every generated block and quote recomputed from ``data``; a
    ``ValueError`` names a block that is missing, repeated or unknown, or a bad quote."""
    return fill_page(page, page_blocks(data), lambda spec: quote(data, spec))


def write_extension_page(
    records: str | Path = RECORDS, page: str | Path = PAGE, img_dir: str | Path | None = None
) -> list[Path]:
    """Rewrite ``page``'s generated blocks and quotes from ``records`` and draw its
    figures into ``img_dir`` (default ``<page folder>/img``). Returns the paths written."""
    data = read_extension(records)
    page = Path(page)
    img_dir = Path(img_dir) if img_dir is not None else page.parent / "img"
    written = [plot_task(curves(data, t), img_dir / f"extension_{safe_filename(t)}.png") for t in task_names(data)]
    page.write_text(render_page(page.read_text(encoding="utf-8"), data), encoding="utf-8")
    return [*written, page]
