"""Output helpers of the ``posenc`` command line: the rich console, progress bars,
result tables and the one-line errors (exit codes) shared by its commands."""

from __future__ import annotations

import dataclasses
import time

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from posenc.experiments.distributed import DistributedError, exit_now
from posenc.experiments.summary import not_learned, not_learned_note, tables, to_rich

console = Console()


def harness_exit(err: BaseException, ctx, interrupted_hint: str) -> typer.Exit:
    """The exit of `train`/`study` for an error: one red line (code 2), a lost rank
    (code 3) or Ctrl-C (code 130, with how to resume)."""
    if isinstance(err, KeyboardInterrupt):
        console.print(f"[yellow]interrupted[/yellow]: {interrupted_hint}")
        return typer.Exit(130)
    exit_ = fail(err, ctx)
    if isinstance(err, DistributedError):
        if ctx is not None:  # the broken group cannot be destroyed safely: leave at once
            exit_now(3)
        return typer.Exit(3)
    return exit_


def fail(err: BaseException, ctx=None) -> typer.Exit:
    where = "" if ctx is None else f" (rank {ctx.rank}/{ctx.world_size})"
    console.print(f"[red]error{where}:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


class NoProgress:
    """Stands in for the progress bars on ranks other than 0 under torchrun."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None

    def reset(self, *args, **kwargs) -> None:
        return None

    def remove_task(self, *args, **kwargs) -> None:
        return None


def csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {value!r}")
    return items


def int_list(option: str, value: str | None) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``None`` stays ``None``); anything else is a
    ``ValueError`` naming the option."""
    items = csv(value)
    if items is None:
        return None
    bad = [v for v in items if not v.lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"{option} must be comma-separated integers, got {value!r} ({bad[0]!r} is not one)")
    return [int(v) for v in items]


def progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


def log_line(msg: str) -> None:
    """Print ``HH:MM:SS msg`` when the console is not a terminal (output to a file or a
    pipe, where rich draws no progress bar until the end); nothing on a terminal."""
    if not console.is_terminal:
        console.print(f"{time.strftime('%H:%M:%S')} {msg}", highlight=False)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"


# Formulas, references and error messages hold brackets (w[bucket(j - i), h]) that rich
# would read as markup and drop: every such text goes through escape().
def encodings_table(classes: list) -> Table:
    table = Table(title="posenc encodings")
    for col in ("name", "family", "parameters", "reference"):
        table.add_column(col, overflow="fold")
    for cls in classes:
        params = ", ".join(f.name for f in dataclasses.fields(cls.Params)) or "-"
        table.add_row(escape(cls.name), escape(cls.family), escape(params), escape(cls.reference))
    return table


def print_encoding(cls) -> None:
    console.print(f"[bold]{escape(cls.name)}[/bold] ({escape(cls.family)})")
    console.print(f"formula:   {escape(cls.formula)}")
    if cls.flaw:
        console.print(f"flaw:      {escape(cls.flaw)}")
    console.print(f"reference: {escape(cls.reference)}")
    table = Table(title="parameters")
    for col in ("name", "default", "type"):
        table.add_column(col)
    for f in dataclasses.fields(cls.Params):
        table.add_row(f.name, escape(_default(f)), escape(str(f.type)))
    console.print(table)


def print_card(title: str, rows: list[dict[str, str]], legend: dict[str, str]) -> None:
    """The report card: one row per encoding when the terminal is wide enough for every
    column, else one column per encoding (in blocks that fit), then what each column means."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    if sum(widths.values()) + 3 * len(columns) + 1 <= console.width:
        table = Table(title=title)
        for column in columns:
            table.add_column(escape(column), no_wrap=True)
        for row in rows:
            table.add_row(*(escape(row[c]) for c in columns))
        console.print(table)
    else:  # transposed: measurements down, encodings across
        label = max(len(c) for c in columns[1:])
        cell = max(max(len(v) for v in r.values()) for r in rows)
        per_block = max(1, (console.width - label - 4) // (cell + 3))
        for start in range(0, len(rows), per_block):
            block = rows[start : start + per_block]
            table = Table(title=title if start == 0 else None)
            table.add_column("measure", no_wrap=True)
            for row in block:
                table.add_column(escape(row[columns[0]]), no_wrap=True)
            for column in columns[1:]:
                table.add_row(escape(column), *(escape(row[column]) for row in block))
            console.print(table)
    for column in columns[1:]:
        console.print(f"[bold]{escape(column)}[/bold]: {escape(legend[column])}", highlight=False)


def print_check(name: str, results: list) -> bool:
    """The contract's pass/fail table; True when every check passed."""
    table = Table(title=f"posenc check {escape(name)}")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.check, "[green]pass[/green]" if r.passed else "[red]FAIL[/red]", escape(r.detail))
    console.print(table)
    failed = [r.check for r in results if not r.passed]
    if failed:
        console.print(f"[red]{len(failed)} of {len(results)} checks failed:[/red] {', '.join(failed)}")
    else:
        console.print(f"all {len(results)} checks passed")
    return not failed


def print_tables(records: list) -> None:
    for t in tables(records):
        console.print(to_rich(t))


def warn_not_learned(records: list) -> None:
    unlearned = not_learned(records)
    if unlearned:
        console.print(f"[yellow]warning:[/yellow] {escape(not_learned_note(unlearned))}")


def print_compare(outputs: dict) -> None:
    """The tables and files of ``posenc compare`` (``pipeline.compare.run_compare``)."""
    for t in outputs["tables"]:
        console.print(to_rich(t))
    warn_not_learned(outputs["records"])
    console.print(f"leaderboard: {outputs['markdown']}")
    console.print(f"merged records, tables and plots: {outputs['leaderboard']}")
    if outputs["report"] is not None:
        console.print(f"report: {outputs['report']}")


def print_outputs(run_dir, outputs) -> None:
    console.print(f"results: {run_dir / 'results.jsonl'}")
    console.print(f"tables: {outputs['markdown']}")
    console.print(f"plots: {run_dir / 'plots'} ({len(outputs['plots'])} files)")
    if outputs["report"] is None:
        console.print("no report.html written (--no-report, or posenc.viz.report is not installed)")
    else:
        console.print(f"report: {outputs['report']}")


def study_hooks(progress, configs: list, runs: int, label: str, parallel: bool) -> dict:
    """Progress hooks for ``run_study`` (one steps bar, reused run after run) or, with
    ``parallel``, for ``run_study_parallel`` (one steps bar per active run). ``configs``
    is the whole plan (hooks get plan indices); ``runs`` how many of them this process
    trains."""
    runs_bar = progress.add_task(label, total=runs, info="")
    bars: dict[int, int] = {}  # plan index -> its steps bar
    finished = [0]

    def describe(cfg) -> str:
        return f"{cfg.task.label} / {cfg.encoding_label} / seed {cfg.train.seed} / lr {cfg.train.lr:g}"

    def start(i, cfg):
        if parallel:
            bars[i] = progress.add_task("  steps", total=cfg.train.steps, info=describe(cfg))
        else:
            progress.update(runs_bar, info=describe(cfg))
            progress.reset(
                bars.setdefault(0, progress.add_task("steps", total=1, info="")), total=cfg.train.steps, info=""
            )

    def end(i, rec, skipped):
        finished[0] += 1
        progress.update(runs_bar, completed=finished[0])
        bar = bars.pop(i, None) if parallel else bars.get(0)
        if parallel and bar is not None:
            progress.remove_task(bar)
        elif skipped and bar is not None:
            progress.update(bar, completed=configs[i].train.steps, info="(already done)")

    def step(*args):  # (step, steps, loss), or (i, step, steps, loss) in parallel
        i, done, total, loss = args if parallel else (0, *args)
        bar = bars.get(i)
        if bar is not None:
            info = f"{describe(configs[i])}, loss {loss:.3f}" if parallel else f"loss {loss:.3f}"
            progress.update(bar, completed=done, info=info)

    return {"on_run_start": start, "on_run_end": end, "on_step": step}
