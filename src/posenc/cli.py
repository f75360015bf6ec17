"""The ``posenc`` command line: thin; parses, calls the library, prints with rich."""

from __future__ import annotations

import dataclasses
import os

import typer
from rich.console import Console
from rich.table import Table

import posenc

app = typer.Typer(help="posenc: a positional-encoding laboratory for PyTorch.", no_args_is_help=True)
console = Console()


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"


@app.command("list")
def list_encodings() -> None:
    """A table of every registered encoding: name, family, parameters, paper."""
    table = Table(title="posenc encodings")
    for col in ("name", "family", "parameters", "reference"):
        table.add_column(col, overflow="fold")
    for name in posenc.available():
        cls = posenc.get(name)
        params = ", ".join(f.name for f in dataclasses.fields(cls.Params)) or "-"
        table.add_row(name, cls.family, params, cls.reference)
    console.print(table)


@app.command("show")
def show(name: str = typer.Argument(..., help="a registered encoding name")) -> None:
    """Parameters with defaults, formula, flaw and reference of one encoding."""
    try:
        cls = posenc.get(name)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"[bold]{name}[/bold] ({cls.family})")
    console.print(f"formula:   {cls.formula}")
    if cls.flaw:
        console.print(f"flaw:      {cls.flaw}")
    console.print(f"reference: {cls.reference}")
    table = Table(title="parameters")
    table.add_column("name")
    table.add_column("default")
    table.add_column("type")
    for f in dataclasses.fields(cls.Params):
        table.add_row(f.name, _default(f), str(f.type))
    console.print(table)


# -- experiments: train, evaluate, study ---------------------------------------------------
# Thin wrappers: the training loop lives in posenc.experiments; here only parsing,
# progress bars and printing. Bad input is one red line and exit code 2 (no traceback).


def _fail(err: BaseException, ctx=None) -> typer.Exit:
    where = "" if ctx is None else f" (rank {ctx.rank}/{ctx.world_size})"
    console.print(f"[red]error{where}:[/red] {err}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


class _NoProgress:
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


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {value!r}")
    return items


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _print_tables(records: list) -> None:
    from posenc.experiments.summary import tables, to_rich

    for t in tables(records):
        console.print(to_rich(t))


@app.command("train")
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML run config (task / model / train sections)"),
    out: str = typer.Option("runs/train", "--out", help="run folder: results.jsonl and checkpoints/ go here"),
    backend: str = typer.Option(None, "--backend", help="torchrun (>1 process): gloo or nccl (default nccl with CUDA)"),
) -> None:
    """Train one model from a YAML config; resumes from its checkpoint, skips if finished.
    Under torchrun: data-parallel (DDP) over the ranks, global batch split (docs/distributed.md)."""
    from posenc.experiments import distributed as pd
    from posenc.experiments.config import load_config
    from posenc.experiments.train import checkpoint_path, train_run

    ctx = None
    try:
        cfg = load_config(config)
        if backend is not None:
            pd.choose_backend(backend)  # a bad name is an error even without torchrun
        if pd.launched():
            ctx = pd.init(backend)
            note = pd.oversubscription(cfg.train.threads) if ctx.device.type == "cpu" else None
            if note and ctx.is_main:
                console.print(f"[yellow]note:[/yellow] {note}")
        show = ctx is None or ctx.is_main
        with _progress() if show else _NoProgress() as progress:
            bar = progress.add_task(cfg.run_id, total=cfg.train.steps, info="")

            def on_step(step: int, total: int, loss: float) -> None:
                progress.update(bar, completed=step, info=f"loss {loss:.3f}")

            if ctx is None:
                record, skipped = train_run(cfg, out, on_step=on_step)
            else:
                record, skipped = pd.train_distributed(cfg, out, ctx, on_step=on_step)
    except (ValueError, TypeError, FloatingPointError) as err:
        raise _fail(err, ctx) from None
    except pd.DistributedError as err:
        _fail(err, ctx)
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: run the same command again to resume from the checkpoint")
        raise typer.Exit(130) from None
    finally:
        pd.shutdown()
    if ctx is not None and not ctx.is_main:
        return
    if skipped:
        console.print(f"already finished: {record['run_id']} (delete its line in results.jsonl to retrain)")
    _print_tables([record])
    console.print(f"results: {out}/results.jsonl")
    console.print(f"checkpoint: {checkpoint_path(out, record['run_id'])}")


@app.command("evaluate")
def evaluate(
    checkpoint: str = typer.Argument(..., help="a finished run's checkpoint (<run dir>/checkpoints/<run_id>.pt)"),
    factors: str = typer.Option(None, "--factors", help="evaluation lengths as multiples of L, e.g. 1,2,4,8,16,32"),
) -> None:
    """Re-evaluate a trained checkpoint, optionally at other lengths, and print the table."""
    import dataclasses as dc

    from posenc.experiments.train import evaluate_model, load_trained, setup

    try:
        cfg, model, s = load_trained(checkpoint)
        if factors is not None:
            fs = tuple(int(f) for f in _csv(factors))
            cfg = dc.replace(cfg, task=dc.replace(cfg.task, eval_factors=fs))
            s2 = setup(cfg)
            if s2.max_len > s.max_len and cfg.model.encoding == "learned":
                raise ValueError(f"the learned encoding has {s.max_len} positions; length {s2.max_len} does not exist")
            s = s2
        with console.status("evaluating"):
            metrics = evaluate_model(model, s)
    except (ValueError, TypeError) as err:
        raise _fail(err) from None
    record = {"task": cfg.task.label, "encoding": cfg.encoding_label, "train_length": cfg.task.train_length,
              "metrics": metrics}  # fmt: skip
    _print_tables([record])


@app.command("study")
def study(
    preset: str = typer.Option("quick", "--preset", help="quick (the default, ~15 min on 2 CPU cores) or full"),
    encodings: str = typer.Option(None, "--encodings", help="comma-separated; NAME+randpos for randomized positions"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated: copy, reverse, ..., shakespeare, stdlib, text"),
    seeds: str = typer.Option(None, "--seeds", help="comma-separated ints, e.g. 0,1,2"),
    steps: int = typer.Option(None, "--steps", help="training steps of every run"),
    text_path: str = typer.Option(None, "--text", help="file or folder for task 'text'"),
    out: str = typer.Option(None, "--out", help="run folder (default runs/<preset>)"),
    threads: int = typer.Option(None, "--threads", help="torch threads (default min(2, cores))"),
) -> None:
    """Train encodings x tasks x seeds (skipping finished runs), then write tables, plots
    and the HTML report into the run folder. Under torchrun the runs are sharded across
    ranks (docs/distributed.md)."""
    from pathlib import Path

    from posenc.experiments import distributed as pd
    from posenc.experiments.study import plan_study, run_study, write_outputs

    try:
        seed_list = [int(x) for x in _csv(seeds)] if seeds is not None else None
        configs, missing = plan_study(
            preset,
            encodings=_csv(encodings),
            tasks=_csv(tasks),
            seeds=seed_list,
            steps=steps,
            text_path=text_path,
            threads=threads,
        )
    except (ValueError, TypeError) as err:
        raise _fail(err) from None
    run_dir = Path(out) if out else Path("runs") / preset
    if missing:
        console.print(f"[yellow]note:[/yellow] not registered in this installation, left out: {', '.join(missing)}")
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        console.print(f"study {preset!r}: {len(configs)} runs into {run_dir}")
    ctx = None
    try:
        if pd.launched():  # under torchrun: plan entry i is trained by rank i % world size
            ctx = pd.init("gloo")
            note = pd.oversubscription(threads)
            if note and ctx.is_main:
                console.print(f"[yellow]note:[/yellow] {note}")
        mine = len(configs) if ctx is None else len(pd.shard(len(configs), ctx.rank, ctx.world_size))
        with _progress() if ctx is None or ctx.is_main else _NoProgress() as progress:
            label = "runs" if ctx is None else f"runs of rank 0/{ctx.world_size}"
            runs_bar = progress.add_task(label, total=mine, info="")
            steps_bar = progress.add_task("steps", total=1, info="")
            finished = [0]

            def start(i, cfg):
                progress.update(runs_bar, info=f"{cfg.task.label} / {cfg.encoding_label} / seed {cfg.train.seed}")
                progress.reset(steps_bar, total=cfg.train.steps, info="")

            def end(i, rec, skipped):
                finished[0] += 1
                progress.update(runs_bar, completed=finished[0])
                if skipped:
                    progress.update(steps_bar, completed=configs[i].train.steps, info="(already done)")

            def on_step(step, total, loss):
                progress.update(steps_bar, completed=step, info=f"loss {loss:.3f}")

            hooks = {"on_run_start": start, "on_run_end": end, "on_step": on_step}
            if ctx is None:
                records = run_study(configs, run_dir, **hooks)
            else:
                records = pd.run_study_sharded(configs, run_dir, ctx, **hooks)
        if ctx is not None and not ctx.is_main:
            console.print(f"rank {ctx.rank}/{ctx.world_size}: {len(records)} runs done; rank 0 writes the outputs")
            return
        _print_tables(records)
        outputs = write_outputs(run_dir)
    except (ValueError, TypeError, FloatingPointError) as err:
        raise _fail(err, ctx) from None
    except pd.DistributedError as err:
        _fail(err, ctx)
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: run the same command again to resume (finished runs are kept)")
        raise typer.Exit(130) from None
    finally:
        pd.shutdown()
    console.print(f"results: {run_dir / 'results.jsonl'}")
    console.print(f"tables: {outputs['markdown']}")
    console.print(f"plots: {run_dir / 'plots'} ({len(outputs['plots'])} files)")
    if outputs["report"] is None:
        console.print("[yellow]note:[/yellow] posenc.viz.report is not installed yet: no report.html written")
    else:
        console.print(f"report: {outputs['report']}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
