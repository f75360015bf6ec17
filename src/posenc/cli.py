"""The ``posenc`` command line: thin; parses, calls the library, prints with rich."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer
from rich.markup import escape

import posenc
from posenc.analysis.contract import CHECKS, check_encoding
from posenc.cli_diagnose import diagnose
from posenc.cli_output import (
    NoProgress,
    console,
    csv,
    encodings_table,
    fail,
    harness_exit,
    int_list,
    log_line,
    print_card,
    print_check,
    print_compare,
    print_encoding,
    print_outputs,
    print_tables,
    progress_bars,
    study_hooks,
    warn_not_learned,
)
from posenc.functional.rope_scaling import extension_rules

app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown")  # markdown: paragraphs reflow to the terminal


LR_SWEEP_HELP = "the first seed at lr 1e-3, 3e-3, 1e-2, the others at the best in-distribution validation lr (full: on)"
PLUGIN_OPTION = typer.Option(
    None, "--plugin", help="a .py file or module that registers encodings (repeatable; or POSENC_PLUGINS)"
)


@app.callback()
def load_plugins(plugin: list[str] = PLUGIN_OPTION) -> None:
    """posenc: a positional-encoding laboratory for PyTorch."""
    try:
        posenc.load_plugins(plugin or [])
    except posenc.registry.PluginError as err:
        raise fail(err) from None


@app.command("list")
def list_encodings() -> None:
    """A table of every registered encoding: name, family, parameters, paper."""
    console.print(encodings_table([posenc.get(name) for name in posenc.available()]))


@app.command("show")
def show(name: str = typer.Argument(..., help="a registered encoding name")) -> None:
    """Parameters with defaults, formula, flaw and reference of one encoding."""
    try:
        cls = posenc.get(name)
    except ValueError as err:
        raise fail(err) from None
    print_encoding(cls)


# -- experiments: train, evaluate, study ---------------------------------------------------
# Thin wrappers: the training loop lives in posenc.experiments; here only parsing,
# progress bars and printing. Bad input is one red line and exit code 2 (no traceback).


@app.command("train")
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML run config (task / model / train sections)"),
    out: str = typer.Option("runs/train", "--out", help="run folder: results.jsonl and checkpoints/ go here"),
    backend: str = typer.Option(None, "--backend", help="torchrun (>1 process): gloo or nccl (default nccl with CUDA)"),
) -> None:
    """Train one model from a YAML config; resumes from its checkpoint, skips if finished.
    Under torchrun: data-parallel (DDP) over the ranks, global batch split (docs/distributed.md)."""
    from posenc.experiments import distributed
    from posenc.experiments.config import load_config
    from posenc.experiments.train import checkpoint_path, train_run

    ctx = None
    try:
        cfg = load_config(config)
        if backend is not None:
            distributed.choose_backend(backend)  # a bad name is an error even without torchrun
        if distributed.launched():
            ctx = distributed.init(backend)
            note = distributed.oversubscription(cfg.train.threads) if ctx.device.type == "cpu" else None
            if note and ctx.is_main:
                console.print(f"[yellow]note:[/yellow] {note}")
        show = ctx is None or ctx.is_main
        with progress_bars() if show else NoProgress() as progress:
            bar = progress.add_task(cfg.run_id, total=cfg.train.steps, info="")

            def on_step(step: int, total: int, loss: float) -> None:
                progress.update(bar, completed=step, info=f"loss {loss:.3f}")

            record, skipped = train_run(cfg, out, on_step=on_step, context=ctx or distributed.SINGLE_PROCESS)
    except (ValueError, TypeError, FloatingPointError, distributed.DistributedError, KeyboardInterrupt) as err:
        raise harness_exit(err, ctx, "run the same command again to resume from the checkpoint") from None
    finally:
        distributed.shutdown()
    if ctx is not None and not ctx.is_main:
        return
    if skipped:
        console.print(f"already finished: {record['run_id']} (delete its line in results.jsonl to retrain)")
    print_tables([record])
    console.print(f"results: {out}/results.jsonl")
    console.print(f"checkpoint: {checkpoint_path(out, record['run_id'])}")


@app.command("evaluate")
def evaluate(
    checkpoint: str = typer.Argument(..., help="a finished run's checkpoint (`<run dir>/checkpoints/<run_id>.pt`)"),
    factors: str = typer.Option(None, "--factors", help="evaluation lengths as multiples of L, e.g. 1,2,4,8,16,32"),
) -> None:
    """Re-evaluate a trained checkpoint, optionally at other lengths, and print the table."""
    from posenc.experiments.train import evaluate_checkpoint

    try:
        factor_list = int_list("--factors", factors)
        with console.status("evaluating"):
            record = evaluate_checkpoint(checkpoint, None if factor_list is None else tuple(factor_list))
    except (ValueError, TypeError) as err:
        raise fail(err) from None
    print_tables([record])


@app.command("study")
def study(
    preset: str = typer.Option("quick", "--preset", help="quick (the default, ~12 min on 2 CPU cores) or full"),
    encodings: str = typer.Option(None, "--encodings", help="comma-separated; NAME+randpos for randomized positions"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated: copy, reverse, ..., shakespeare, stdlib, text"),
    seeds: str = typer.Option(None, "--seeds", help="comma-separated ints, e.g. 0,1,2"),
    steps: int = typer.Option(None, "--steps", help="training steps of every run"),
    text_path: str = typer.Option(None, "--text", help="file or folder for task 'text'"),
    out: str = typer.Option(None, "--out", help="run folder (default `runs/<preset>`)"),
    threads: int = typer.Option(None, "--threads", help="torch threads per run (default min(2, cores // jobs))"),
    jobs: int = typer.Option(None, "--jobs", help="runs trained side by side (default: one per core, at most 8)"),
    lr_sweep: bool = typer.Option(None, "--lr-sweep/--no-lr-sweep", help=LR_SWEEP_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (its phases, what is done) and stop"),
    no_report: bool = typer.Option(False, "--no-report", help="skip report.html (tables and plots only)"),
    summarize_only: bool = typer.Option(
        False, "--summarize-only", help="train nothing: tables, plots and report from the finished runs in --out"
    ),
) -> None:
    """Train encodings x tasks x seeds (skipping finished runs), then write tables, plots
    and the HTML report into the run folder. Runs are trained by --jobs worker processes
    side by side; under torchrun they are sharded across ranks (docs/distributed.md).
    With a learning-rate sweep the study has two phases: the sweep, then the other seeds."""
    from posenc.experiments import distributed
    from posenc.experiments.parallel import StudyWorkerError, run_study_parallel, run_study_sharded, shard
    from posenc.experiments.results import read_results
    from posenc.experiments.study import run_study
    from posenc.pipeline.study import prepare_study, write_study_outputs

    run_dir = Path(out) if out else Path("runs") / preset
    try:
        request = {"encodings": csv(encodings), "tasks": csv(tasks), "seeds": int_list("--seeds", seeds)}
        request.update(steps=steps, text_path=text_path, lr_sweep=lr_sweep)
        launched = distributed.launched()
        plan, jobs, jobs_note = prepare_study(preset, request, run_dir, threads=threads, jobs=jobs, launched=launched)
        configs = plan.outline
        lines = [f"study {preset!r}: {len(configs)} runs into {run_dir}", *plan.describe(read_results(run_dir))]
        lines += [f"left out (not registered, or not buildable at this size): {m}" for m in plan.missing]
    except (ValueError, TypeError) as err:
        raise fail(err) from None
    if summarize_only:
        try:
            outputs = write_study_outputs(run_dir, report=not no_report)
        except (ValueError, TypeError) as err:
            raise fail(err) from None
        print_tables(read_results(run_dir))
        warn_not_learned(read_results(run_dir))
        print_outputs(run_dir, outputs)
        return
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        console.print(escape("\n".join(lines + ["nothing trained (--dry-run)"] * dry_run)))
    if dry_run:
        return
    if jobs_note:
        console.print(f"[yellow]note:[/yellow] {jobs_note}")
    ctx = None
    stop = (
        ValueError,
        TypeError,
        FloatingPointError,
        distributed.DistributedError,
        StudyWorkerError,
        KeyboardInterrupt,
    )
    try:
        if distributed.launched():  # under torchrun: plan entry i is trained by rank i % world size
            ctx = distributed.init("gloo")
            note = distributed.oversubscription(threads)
            if note and ctx.is_main:
                console.print(f"[yellow]note:[/yellow] {note}")
        mine = len(configs) if ctx is None else len(shard(len(configs), ctx.rank, ctx.world_size))
        parallel = ctx is None and jobs > 1
        with progress_bars() if ctx is None or ctx.is_main else NoProgress() as progress:
            label = "runs" if ctx is None else f"runs of rank 0/{ctx.world_size}"
            if parallel:
                label = f"runs ({jobs} processes x {configs[0].train.threads} threads)"
            hooks = study_hooks(progress, configs, mine, label, parallel)
            if ctx is not None:
                records = run_study_sharded(plan, run_dir, ctx, **hooks)
            elif parallel:
                records = run_study_parallel(plan, run_dir, jobs, **hooks)
            else:
                records = run_study(plan, run_dir, **hooks)
        if ctx is not None and not ctx.is_main:
            console.print(f"rank {ctx.rank}/{ctx.world_size}: {len(records)} runs done; rank 0 writes the outputs")
            return
        print_tables(records)
        warn_not_learned(records)
        outputs = write_study_outputs(run_dir, report=not no_report)
    except stop as err:
        raise harness_exit(err, ctx, "run the same command again to resume (finished runs are kept)") from None
    finally:
        distributed.shutdown()
    print_outputs(run_dir, outputs)


@app.command("compare")
def compare(
    name: str = typer.Argument(..., help="the encoding to rank (a plugin or a built-in; NAME+randpos too)"),
    preset: str = typer.Option("full", "--preset", help="full (the committed baselines; see docs/plugins.md), smoke"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated (default: the preset's)"),
    seeds: str = typer.Option(None, "--seeds", help="comma-separated ints (default: the preset's)"),
    baselines: str = typer.Option(None, "--baselines", help="results.jsonl (default docs/data/study_results.jsonl)"),
    out: str = typer.Option(None, "--out", help="run folder (default runs/compare-NAME)"),
    threads: int = typer.Option(None, "--threads", help="torch threads per run (default min(2, cores // jobs))"),
    jobs: int = typer.Option(None, "--jobs", help="runs trained side by side (default: one per core, at most 8)"),
    no_report: bool = typer.Option(False, "--no-report", help="skip the leaderboard's report.html"),
) -> None:
    """Rank NAME among baseline records without retraining them: train only NAME's runs of
    the preset (the baselines' configs but the encoding, checked), write compare.md."""
    from posenc.experiments.parallel import StudyWorkerError
    from posenc.pipeline.compare import run_compare

    try:
        request = dict(tasks=csv(tasks), seeds=int_list("--seeds", seeds), baselines=baselines, out=out)
        with progress_bars() as progress:
            outputs = run_compare(
                name,
                preset,
                **request,
                threads=threads,
                jobs=jobs,
                report=not no_report,
                say=console.print,
                hooks=lambda configs, label, parallel: study_hooks(progress, configs, len(configs), label, parallel),
            )
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, StudyWorkerError, KeyboardInterrupt) as err:
        raise harness_exit(err, None, "run the same command again to resume (finished runs are kept)") from None
    print_compare(outputs)


# -- evidence: analyze, plot, report, check ------------------------------------------------------
@app.command("analyze")
def analyze(
    names: list[str] = typer.Argument(None, help="encodings to measure (default: every registered one)"),  # noqa: B008
    dim: int = typer.Option(32, help="model width"),
    heads: int = typer.Option(2, help="attention heads"),
    horizon: int = typer.Option(256, help="positions measured"),
    train_length: int = typer.Option(128, help="the 'trained' length for the beyond-L measurements"),
    pretrained: str = typer.Option(
        None, help="also measure a local transformers model directory ('minilm': all-MiniLM-L6-v2)"
    ),
) -> None:
    """The report card: every claim of the classic story, measured, one row per encoding."""
    from posenc import analysis

    try:
        cfg = analysis.CardConfig(
            dim=dim,
            num_heads=heads,
            horizon=horizon,
            train_length=train_length,
            beyond_horizon=max(4 * train_length, horizon + 1),
        )
        names = names or posenc.available()
        for n in names:
            posenc.get(n)
        cards = []
        with console.status("measuring") as status:
            for n in names:
                status.update(f"measuring {n}")
                cards.append(analysis.report_card(n, cfg))
            if pretrained:
                from posenc.analysis.pretrained import learned_probe, load_positions, minilm_dir

                status.update(f"measuring {pretrained}")
                path = minilm_dir() if pretrained == "minilm" else pretrained
                info = load_positions(path)
                probe = learned_probe(info, name="all-MiniLM-L6-v2" if pretrained == "minilm" else None)
                cards.append(analysis.card_for_probe(probe, cfg, token_norm=info.token_norm))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise fail(err) from None
    title = f"posenc report card (dim={dim}, {heads} heads, horizon {horizon}, L={train_length})"
    rows = [{k: analysis.format_value(v) for k, v in card.row().items()} for card in cards]
    print_card(title, rows, analysis.CARD_COLUMNS)


@app.command("plot")
def plot(
    name: str = typer.Argument(
        ..., help="encoding name ('all' for magnitude/distance; a model dir for pretrained; a .pt for attention)"
    ),
    kind: str = typer.Option(
        ...,
        "--kind",
        "-k",
        help="heatmap, similarity, magnitude, distance, bias, buckets, rotation, wavelengths, decay, scaling, "
        "attention, pretrained",
    ),
    output: str = typer.Option(..., "--output", "-o", help="the .png or .svg file to write"),
    dim: int = typer.Option(None, help="model width"),
    heads: int = typer.Option(None, "--heads", help="attention heads"),
    horizon: int = typer.Option(None, help="positions drawn"),
    steps: int = typer.Option(None, help="training steps (kind attention)"),
    length: int = typer.Option(None, help="example length (kind attention of a checkpoint)"),
) -> None:
    """Draw one figure of an encoding and write it as PNG or SVG."""
    import inspect

    from posenc.pipeline import figures

    options = {"dim": dim, "num_heads": heads, "horizon": horizon, "steps": steps, "length": length}
    try:
        make, args = figures.figure_maker(name, kind)
        accepted = inspect.signature(make).parameters
        kwargs = {}
        for key, value in options.items():
            if value is None:
                continue
            if key not in accepted:
                raise ValueError(f"--{'heads' if key == 'num_heads' else key} does not apply to kind {kind!r}")
            kwargs[key] = value
        with console.status(f"drawing {kind} of {name}"):
            fig = make(*args, **kwargs)
            path = figures.save(fig, output)
    except figures.FigureUnavailable as err:
        console.print(f"[yellow]skipped:[/yellow] {escape(str(err))}")
        raise typer.Exit(3) from None
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise fail(err) from None
    console.print(f"wrote {path}")


@app.command("report")
def report(
    output: str = typer.Option("report.html", "--output", "-o", help="the HTML file to write"),
    study: str = typer.Option(None, "--study", help="a study run directory with results.jsonl"),
    encodings: str = typer.Option(None, help="comma-separated encodings (default: every registered one)"),
    attention_steps: int = typer.Option(200, help="training steps of the tiny models behind the attention maps"),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="leave out the all-MiniLM-L6-v2 section"),
    extension: str = typer.Option(
        None, "--extension", help="an extension.json written by `posenc extend` (adds its section)"
    ),
) -> None:
    """Write one self-contained HTML report (report card, figures, study results)."""
    from posenc.pipeline.extension import extension_report_section
    from posenc.pipeline.report import write_report

    names = [n.strip() for n in encodings.split(",") if n.strip()] if encodings else None
    try:
        extra = []
        if extension:
            extra.append(extension_report_section(extension))
        with console.status("writing the report") as status:
            path = write_report(
                output,
                study_dir=study,
                extra_sections=extra,
                encodings=names,
                attention_steps=attention_steps,
                pretrained=not no_pretrained,
                progress=lambda msg: status.update(msg),
            )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise fail(err) from None
    console.print(f"wrote {path}")


@app.command("extend")
def extend(
    preset: str = typer.Option(
        "quick", "--preset", help="quick (2 tasks x 3 seeds; hours on 2 cores) or smoke (seconds)"
    ),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated, default shakespeare,copy"),
    seeds: str = typer.Option(None, "--seeds", help="comma-separated ints (default: the preset's)"),
    checkpoint: str = typer.Option(
        None,
        "--checkpoint",
        help="comma-separated finished rope run checkpoints to extend instead of training the preset's base runs",
    ),
    rules: str = typer.Option(
        ",".join(extension_rules()),
        "--rules",
        help="comma-separated RoPE scaling rules (aliases such as pi accepted)",
    ),
    factors: str = typer.Option("2,4,8", "--factors", help="evaluation lengths as multiples of L (integers >= 1)"),
    finetune_factor: int = typer.Option(None, "--finetune-factor", help="fine-tune at this multiple of L"),
    finetune_steps: int = typer.Option(None, "--finetune-steps", help="fine-tuning steps per rule (0: no fine-tune)"),
    finetune_lr: float = typer.Option(None, "--finetune-lr", help="fine-tuning learning rate (default: the preset's)"),
    baselines: str = typer.Option("alibi,t5", "--baselines", help="comma-separated non-RoPE encodings ('' for none)"),
    out: str = typer.Option("runs/extend", "--out", help="output folder"),
    base_dir: str = typer.Option(None, "--base-dir", help="where base runs are trained/reused (default `<out>/base`)"),
    threads: int = typer.Option(None, "--threads", help="torch threads (default min(2, cores))"),
) -> None:
    """Context extension: a RoPE model trained at L, scored at 2L..8L with each scaling
    rule zero-shot and after a short fine-tune; baselines; tables, plots, extension.json."""
    from posenc.experiments.extend import check_request, finetune_settings, run_extension
    from posenc.experiments.summary import to_rich
    from posenc.pipeline.extension import all_tables, write_extension_outputs

    try:
        finetune = finetune_settings(preset, factor=finetune_factor, steps=finetune_steps, lr=finetune_lr)
        command = " ".join(["posenc", *map(shlex.quote, sys.argv[1:])]) if "extend" in sys.argv else "posenc extend"
        request = dict(
            rules=tuple(csv(rules)),
            factors=tuple(int_list("--factors", factors)),
            baselines=tuple(csv(baselines) or ()) if baselines.strip() else (),
            checkpoints=csv(checkpoint),
            tasks=csv(tasks),
            seeds=int_list("--seeds", seeds),
        )
        check_request(preset, **request)
        with progress_bars() as progress:
            bar = progress.add_task("extend", total=1, info="")

            def on_stage(msg: str) -> None:
                progress.reset(bar, total=1, description=msg, info="")
                log_line(msg)  # hours of work: a line per stage where no bar is drawn (a log file)

            def on_step(step: int, total: int, loss: float) -> None:
                progress.update(bar, total=total, completed=step, info=f"loss {loss:.3f}")

            data = run_extension(
                preset,
                out,
                **request,
                finetune=finetune,
                base_dir=base_dir,
                threads=threads,
                command=command,
                on_stage=on_stage,
                on_step=on_step,
            )
        outputs = write_extension_outputs(data, out)
    except (ValueError, TypeError, FloatingPointError) as err:
        raise fail(err) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: run the same command again (finished runs are kept)")
        raise typer.Exit(130) from None
    for t in all_tables(data):
        console.print(to_rich(t))
    if data["baselines_missing"]:
        console.print(f"[yellow]note:[/yellow] not registered, left out: {', '.join(data['baselines_missing'])}")
    console.print(f"results: {outputs['json']}")
    console.print(f"tables: {outputs['markdown']}")
    console.print(f"plots: {', '.join(str(p) for p in outputs['plots'])}")
    console.print(f"report: posenc report --extension {shlex.quote(str(Path(out) / 'extension.json'))}")


@app.command("check")
def check(
    name: str = typer.Argument(..., help="a registered encoding name (plugins included)"),
    checks: str = typer.Option(None, "--checks", help=f"comma-separated subset of: {', '.join(CHECKS)}"),
    seed: int = typer.Option(0, "--seed", help="seed of the random inputs"),
) -> None:
    """Run the encoding contract on NAME: shapes and dtypes of every hook, parameter
    validation, causality, KV-cache decoding, translation invariance (where claimed),
    long positions, score_mod = bias. Exit code 1 when a check fails."""
    try:
        results = check_encoding(name, checks=tuple(csv(checks)) if checks else CHECKS, seed=seed)
    except (ValueError, TypeError) as err:
        raise fail(err) from None
    if not print_check(name, results):
        raise typer.Exit(1)


app.command("diagnose")(diagnose)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
