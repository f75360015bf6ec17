"""``posenc diagnose``: the mechanism probes of trained runs, as recovery tables.

Registered on the ``posenc`` app by ``posenc.cli`` (``app.command("diagnose")(diagnose)``);
thin: parses, calls ``posenc.experiments.diagnose_runs`` and ``diagnose_summary``, prints.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from posenc.cli_output import console, fail, progress_bars
from posenc.experiments.diagnose_summary import (
    BAR,
    attention_table,
    attribution_legend,
    attribution_table,
    hypothesis_table,
    recovery_tables,
)
from posenc.experiments.summary import to_markdown, to_rich

METRICS = ("exact_match", "token_accuracy")
PATHS_ARGUMENT = typer.Argument(
    ..., help="a study folder (results.jsonl + checkpoints/) or finished runs' checkpoints (.pt)"
)


def diagnose(
    paths: list[str] = PATHS_ARGUMENT,
    samples: int = typer.Option(128, "--samples", help="synthetic tasks: test examples per length and condition"),
    metric: str = typer.Option("exact_match", "--metric", help="synthetic score: exact_match or token_accuracy"),
    bar: float = typer.Option(BAR, "--bar", help="share of the drop an intervention must explain to be named"),
    save: bool = typer.Option(True, "--save/--no-save", help="keep computed probes in `<folder>/probes.jsonl`"),
    attention: bool = typer.Option(True, "--attention/--no-attention", help="print the attention entropy table"),
    markdown: bool = typer.Option(
        False, "--markdown", help="print the tables as markdown (readable when piped; for docs)"
    ),
) -> None:
    """Why each encoding fails past its training length L: at every test length E > L,
    the score under interventions that each remove one cause (evaluation only).

    shifted: inputs of length L with the positions of the end of length E (unseen
    positions alone); window: length E, every query restricted to its last W keys, W the
    longest training sequence (no unseen distance, no dilution); temperature: length E,
    the whole pre-softmax score (q k^T / sqrt(d) plus any bias) times log T(E) / log T(L),
    T(n) the input tokens at length n (dilution); window+temp: both. The table gives
    (s_c - s_E) / (s_L - s_E): the share of the drop from L to E that each intervention
    recovers (exact match, or log perplexity for corpora), the mean and the range over
    seeds. Records that carry probes are read; the others are probed from their
    checkpoints and kept in probes.jsonl.
    """
    # Imported here, as posenc.cli's commands do: the training modules stay out of `posenc --help`.
    from posenc.experiments.diagnose_runs import checkpoint_probes, study_probes

    if metric not in METRICS:
        raise fail(ValueError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}"))
    options = {"samples": samples}
    records, skipped = [], []
    try:
        with progress_bars() as progress:
            for path in paths:
                p = Path(path)
                bar_id = progress.add_task(f"probing {escape(p.name)}", total=None, info="")
                if p.is_dir():

                    def on_run(done: int, total: int, label: str, bar_id: int = bar_id) -> None:
                        progress.update(bar_id, completed=done, total=total, info=escape(label))

                    recs, left_out = study_probes(p, save=save, on_run=on_run, **options)
                    records += recs
                    skipped += left_out
                else:
                    records.append(checkpoint_probes(p, **options))
                    progress.update(bar_id, completed=1, total=1)
    except (ValueError, TypeError) as err:
        raise fail(err) from None
    for line in skipped:
        console.print(f"[yellow]left out:[/yellow] {escape(line)}", highlight=False)
    if not records:
        raise fail(ValueError("no run to diagnose: none has probes or a checkpoint"))
    summary = attribution_table(records, metric=metric, bar=bar)
    claims = hypothesis_table(records, metric=metric, bar=bar)
    shown = [
        *recovery_tables(records, metric=metric, bar=bar),
        *([summary] if summary is not None else []),
        *([claims] if claims is not None else []),
        *(attention_table(records) if attention else []),
    ]
    if markdown:
        console.print(
            to_markdown(shown) + "\n" + attribution_legend(bar), markup=False, highlight=False, soft_wrap=True
        )
        return
    for table in shown:
        console.print(to_rich(table))
    console.print(escape(attribution_legend(bar)), highlight=False)
