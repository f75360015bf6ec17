"""Training one run: model, data, loop, atomic checkpoints, exact resume, evaluation.

``train_run(config, run_dir)`` trains a ``posenc.Transformer`` (causal decoder) on the
task of ``config``, checkpoints every ``checkpoint_every`` steps, evaluates, and appends
one line to ``<run_dir>/results.jsonl``. Re-running a finished run returns its record
without training; a run with a checkpoint resumes from it and ends with the same
metrics as an uninterrupted run (the checkpoint holds the model, the optimizer, the
step, elapsed time and every random state the loop uses).

One loop for one process and for N (``context``, a ``DistContext`` from
``distributed.init()`` under torchrun; one process is world size 1): every rank draws
the SAME global batch of ``train.batch_size`` rows from the shared seeded generator and
keeps its contiguous slice of ``batch_size / world_size`` rows. Each rank's loss is its
slice's summed token loss divided by the token count of the whole global batch, times
``world_size``; DDP averages gradients over ranks, so the gradient is that of the
global mean loss (up to float32 summation order; in one process it is exactly the mean
loss). Rank 0 decides whether the run is finished, resumes or starts from ``init_from``
(and broadcasts what it read), writes every checkpoint and the results line; every rank
evaluates its identical model (no collective after training, so a long evaluation
cannot hit the collective timeout). Checkpoints do not depend on N: a run started with
N processes resumes with any other N.
"""

from __future__ import annotations

import dataclasses
import io
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posenc.data.synthetic import PAD, SyntheticTask
from posenc.data.text import CharCorpus, load_text
from posenc.experiments.config import RunConfig, TrainConfig, config_from_dict, default_threads, derive_seed
from posenc.experiments.diagnose import probe_metrics
from posenc.experiments.distributed import SINGLE_PROCESS, DistContext
from posenc.experiments.evaluate import (
    lm_metrics,
    lm_validation,
    random_positions,
    synthetic_metrics,
    synthetic_validation,
)
from posenc.experiments.fast_step import (
    FastStep,
    ReferenceStep,
    Step,
    make_optimizer,
    resolve_mode,
    set_implementation,
)
from posenc.experiments.results import append_result, atomic_write_bytes, find_result, git_commit
from posenc.model import Transformer, TransformerConfig

CHECKPOINT_FORMAT = 1
StepCallback = Callable[[int, int, float], None]
#: ``derive_seed(train.seed, stream)`` seeds each random stream of a run.
INIT_STREAM = 1  # the model's initial weights (torch's global generator)
DATA_STREAM = 2  # the training batches (and randomized positions)


# -- the task, the model -----------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Everything a run needs besides the weights: the task data and the sizes."""

    config: RunConfig
    task: SyntheticTask | None
    corpus: CharCorpus | None
    vocab_size: int
    eval_lengths: list[int]
    max_len: int  # longest position the model must represent (+1)
    max_position: int  # range of randomized positions
    stride: int | None = None  # the sliding-window stride (None: E / 4 at length E)
    length_dependent: bool = False  # the built encoding's vectors depend on the sequence length


def setup(config: RunConfig, corpus_cache: dict | None = None) -> Setup:
    """Build the data of ``config`` and the sizes derived from it (lengths to score,
    the longest position any evaluation or randomized training uses). ``corpus_cache``
    keeps corpora across the runs of a study (keyed by text and held-out layout)."""
    t = config.task
    L = t.train_length
    task, corpus, stride = None, None, None
    if t.is_lm:
        held = t.held_out()
        key = (t.name, t.text_path, t.max_chars, held)
        corpus = corpus_cache.get(key) if corpus_cache is not None else None
        if corpus is None:
            corpus = CharCorpus.from_text(load_text(t.name, t.text_path, t.max_chars), **dataclasses.asdict(held))
            if corpus_cache is not None:
                corpus_cache[key] = corpus
        lengths, stride, vocab_size = t.lm_lengths, t.stride, corpus.vocab_size
        longest, trained = max(lengths), L
    else:
        task = t.synthetic_task()
        lengths, vocab_size = t.synthetic_lengths, task.vocab_size
        longest = task.sequence_length(max(lengths)) - 1  # the last token is only a target
        trained = task.sequence_length(L) - 1
    max_pos = config.train.max_position or longest
    if max_pos < trained:
        raise ValueError(f"max_position={max_pos} is smaller than the longest training sequence ({trained})")
    max_len = max(longest, max_pos)
    length_dependent = model_config(config, vocab_size, max_len).build_encoding().length_dependent
    return Setup(config, task, corpus, vocab_size, lengths, max_len, max_pos, stride, bool(length_dependent))


def model_config(config: RunConfig, vocab_size: int, max_len: int) -> TransformerConfig:
    """The ``TransformerConfig`` of a run (a causal decoder)."""
    m = config.model
    return TransformerConfig(
        vocab_size=vocab_size,
        dim=m.dim,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        causal=True,
        encoding=m.encoding,
        encoding_params=dict(m.encoding_params),
        max_len=max_len,
    )


def build_model(config: RunConfig, vocab_size: int, max_len: int) -> Transformer:
    return Transformer(model_config(config, vocab_size, max_len))


def training_batch(
    run_setup: Setup, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The next training batch drawn from ``generator``: (inputs [b, s], targets [b, s],
    loss mask [b, s] or None, positions [b, s] or [s]), ``b = train.batch_size``.

    Synthetic tasks mix lengths ``1..L`` in every batch (right-padded; see
    ``SyntheticTask.sample_mixed``); with randomized positions each sequence gets its own
    sorted draw from ``0..max_position-1`` (padding stays at 0).
    """
    tc = run_setup.config.train
    train_length = run_setup.config.task.train_length
    if run_setup.corpus is not None:
        window = run_setup.corpus.sample(train_length, tc.batch_size, generator)  # [b, L+1]
        inputs = window[:, :-1]
        positions = torch.arange(inputs.shape[1])  # [L]
        if tc.randomized_positions:
            positions = random_positions(inputs.shape[0], inputs.shape[1], run_setup.max_position, generator)
        return inputs, window[:, 1:], None, positions
    ns = torch.randint(1, train_length + 1, (tc.batch_size,), generator=generator)  # [b]
    ex, positions = run_setup.task.sample_mixed(ns, generator)
    if not tc.randomized_positions and not run_setup.length_dependent:
        # Padding follows each example and the mask is causal, so shared positions 0..s-1
        # give the same outputs on real tokens, and bias encodings build [h, s, s], not [b, h, s, s].
        positions = torch.arange(ex.tokens.shape[1])  # [s]
    if tc.randomized_positions:
        lengths = (ex.tokens != PAD).sum(dim=1)  # [b]; padding only at the end of a row
        for n in lengths.unique().tolist():  # each row: its own sorted draw of s_i positions
            rows = (lengths == n).nonzero().squeeze(1)  # [k]
            positions[rows, :n] = random_positions(len(rows), n, run_setup.max_position, generator)
    return ex.tokens[:, :-1], ex.tokens[:, 1:], ex.answer_mask[:, 1:], positions[..., :-1]


def learning_rate(step: int, tc: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (from 0): linear warm-up over
    ``tc.warmup`` steps, then cosine decay to a tenth of ``tc.lr`` at ``tc.steps``."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- checkpoints ---------------------------------------------------------------------------


def checkpoint_path(run_dir: Path, run_id: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{run_id}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize to memory, then write atomically (temp file + ``os.replace``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def checkpoint_state(
    config: RunConfig, step: int, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, elapsed: float
) -> dict[str, Any]:
    """Everything a run needs to resume exactly (weights on the CPU, optimizer, RNGs)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "run_id": config.run_id,
        "config": config.to_dict(),
        "step": step,
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()},
        "elapsed": elapsed,
    }


def result_record(
    config: RunConfig, evaluation: dict[str, Any], wall_time_s: float, train_step: str = "reference"
) -> dict[str, Any]:
    """One ``results.jsonl`` line (the schema in ``results.py``): ``evaluation`` is
    ``evaluate_run``'s dict (``metrics``, ``validation``, and ``metrics_random``/``corpus``
    where they apply); ``train_step`` says which step trained it (``fast_step``: the same
    arithmetic, float32 sums in another order)."""
    return {
        "run_id": config.run_id,
        "task": config.task.label,
        "encoding": config.encoding_label,
        "seed": config.train.seed,
        "train_length": config.task.train_length,
        "config": config.to_dict(),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "wall_time_s": round(wall_time_s, 3),
        "train_step": train_step,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **evaluation,
    }


def check_checkpoint_config(state: dict[str, Any], config: RunConfig, ckpt: Path) -> None:
    """A checkpoint resumes only the run it was written for: same run id and config
    (normalized through the dataclasses, so fields added since with their defaults
    compare equal; the thread count may differ)."""
    try:
        saved = config_from_dict(state["config"]).to_dict()
    except (ValueError, TypeError) as err:
        raise ValueError(f"checkpoint {str(ckpt)!r} has an invalid config ({err}); delete it to restart") from None
    if state["run_id"] != config.run_id or _without_threads(saved) != _without_threads(config.to_dict()):
        raise ValueError(f"checkpoint {str(ckpt)!r} belongs to a different config; delete it to restart")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; a truncated or foreign file is a ``ValueError``."""
    if not Path(path).is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if Path(path).suffix.lower() in (".yaml", ".yml", ".json"):
        raise ValueError(
            f"{str(path)!r} is a run config, not a checkpoint: train it with `posenc train --config {path}`, "
            "then use <run dir>/checkpoints/<run_id>.pt"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/... for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({first[:200]})") from None
    need = {"format", "run_id", "config", "step", "model", "optimizer", "rng", "elapsed"}
    if not isinstance(state, dict) or not need <= set(state) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a posenc run checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# -- the run ---------------------------------------------------------------------------------


def evaluate_model(model: nn.Module, run_setup: Setup, *, randomized: bool = False) -> list[dict[str, Any]]:
    """The metrics of ``model`` on the test set of ``run_setup`` at every evaluation
    length: positions ``0..s-1``, or with ``randomized`` Ruoss et al.'s sorted random
    positions below ``max_position`` (at the lengths whose sequences fit there)."""
    t, seed = run_setup.config.task, run_setup.config.train.seed
    top = run_setup.max_position if randomized else None
    if run_setup.corpus is not None:
        lengths = [e for e in run_setup.eval_lengths if top is None or e <= top]
        return lm_metrics(model, run_setup.corpus, lengths, stride=run_setup.stride, max_position=top, seed=seed)
    task = run_setup.task
    fits = [n for n in run_setup.eval_lengths if top is None or task.sequence_length(n) - 1 <= top]
    return synthetic_metrics(model, task, fits, samples=t.eval_samples, seed=seed, max_position=top)


def validate_model(model: nn.Module, run_setup: Setup) -> dict[str, Any]:
    """The in-distribution validation score (``record["validation"]``, for choosing the
    learning rate, never the test set): held-out validation segments at ``L`` (corpora)
    or fresh examples at lengths ``1..L`` (synthetic), with randomized positions when
    the run trained with them (its training distribution)."""
    t, tc = run_setup.config.task, run_setup.config.train
    top = run_setup.max_position if tc.randomized_positions else None
    if run_setup.corpus is not None:
        return lm_validation(model, run_setup.corpus, t.train_length, max_position=top, seed=tc.seed)
    return synthetic_validation(
        model, run_setup.task, t.train_length, samples=t.eval_samples, seed=tc.seed, max_position=top
    )


def evaluate_run(model: nn.Module, run_setup: Setup) -> dict[str, Any]:
    """The evaluation keys of a run's record: ``metrics``, ``validation``,
    ``metrics_random`` (runs trained with randomized positions), ``corpus`` (corpora:
    the text's sha256 and the Python version, which the stdlib corpus depends on) and
    ``probes`` (``diagnose.probe_metrics``: scores past L under the mechanism interventions)."""
    out: dict[str, Any] = {"metrics": evaluate_model(model, run_setup)}
    if run_setup.config.train.randomized_positions:
        out["metrics_random"] = evaluate_model(model, run_setup, randomized=True)
    out["validation"] = validate_model(model, run_setup)
    if run_setup.corpus is not None:
        c, t = run_setup.corpus, run_setup.config.task
        out["corpus"] = {
            "name": t.label,
            "sha256": c.sha256,
            "chars": len(c.tokens),
            "python_version": platform.python_version(),
            "test_tokens": c.test.scored * c.test.count,
            "validation_tokens": c.validation.scored * c.validation.count,
        }
    out["probes"] = probe_metrics(model, run_setup)
    return out


def _without_threads(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict without ``train.threads`` (speed only; a run may resume with other threads,
    though bitwise-equal metrics are only promised for the same thread count)."""
    return {**d, "train": {k: v for k, v in d["train"].items() if k != "threads"}}


def _read_start(config: RunConfig, run_dir: Path) -> tuple[str, Any]:
    """Where the run starts, read from ``run_dir``: ("done", its record) | ("resume",
    checkpoint state) | ("init", the model weights of ``train.init_from``) | ("fresh", None)."""
    done = find_result(run_dir, config.run_id)
    if done is not None:
        return "done", done
    ckpt = checkpoint_path(run_dir, config.run_id)
    if ckpt.exists():
        try:
            state = load_checkpoint(ckpt)
        except ValueError as err:
            raise ValueError(f"{err}; delete it to restart that run") from None
        check_checkpoint_config(state, config, ckpt)
        return "resume", state
    init_from = config.train.init_from
    if init_from is not None:  # fine-tuning: start from another run's weights
        init = load_checkpoint(Path(init_from))
        if init["step"] < config_from_dict(init["config"]).train.steps:
            raise ValueError(f"init_from checkpoint {init_from!r} is of an unfinished run (step {init['step']})")
        return "init", init["model"]
    return "fresh", None


def _start(config: RunConfig, run_dir: Path, context: DistContext) -> tuple[str, Any]:
    """``_read_start`` on rank 0, the same answer on every rank (a bad checkpoint is a
    ``ValueError`` on every rank)."""
    decision: tuple[str, Any] = ("fresh", None)
    if context.is_main:
        try:
            decision = _read_start(config, run_dir)
        except ValueError as err:
            decision = ("error", str(err))
    kind, payload = context.broadcast(decision, "sharing the checkpoint from rank 0")
    if kind == "error":
        raise ValueError(payload)
    return kind, payload


def train_run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    on_step: StepCallback | None = None,
    corpus_cache: dict | None = None,
    context: DistContext = SINGLE_PROCESS,
    step_mode: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Train, evaluate and record one run; returns ``(record, skipped)`` (on every rank;
    only rank 0 writes files).

    ``skipped`` is True when ``results.jsonl`` already held the run. ``on_step(step,
    steps, loss)`` is called after every optimizer step with the mean loss of the whole
    (global) batch (progress bars; tests raise from it to simulate a crash). ``context``:
    this process's place in a torchrun job (``distributed.init()``); the default is one
    process. ``step_mode``: ``"fast"``, ``"reference"`` or ``"auto"`` (default: the
    environment variable ``POSENC_TRAIN_STEP``, else ``"auto"``); see ``fast_step``.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    run_dir = Path(run_dir)
    tc = config.train
    rows = context.rows(tc.batch_size)  # this rank's rows of every global batch
    context.check_same(config.run_id, "the run config")
    start_kind, start_state = _start(config, run_dir, context)
    if start_kind == "done":
        return start_state, True
    torch.set_num_threads(tc.threads or default_threads())
    run_setup = setup(config, corpus_cache)

    torch.manual_seed(derive_seed(tc.seed, INIT_STREAM))
    model = build_model(config, run_setup.vocab_size, run_setup.max_len)
    if start_kind == "init":
        try:
            model.load_state_dict(start_state)
        except RuntimeError as err:
            raise ValueError(
                f"init_from checkpoint {tc.init_from!r} does not fit this model: {str(err).splitlines()[0]}"
            ) from None
    model.to(context.device)
    varying = tc.randomized_positions or (run_setup.corpus is None and run_setup.length_dependent)
    mode = resolve_mode(step_mode, steps=tc.steps, varying_positions=varying)
    opt = make_optimizer(model, mode, lr=tc.lr, weight_decay=tc.weight_decay)
    generator = torch.Generator().manual_seed(derive_seed(tc.seed, DATA_STREAM))  # the same stream on every rank
    step, elapsed = 0, 0.0
    ckpt = checkpoint_path(run_dir, config.run_id)
    if start_kind == "resume":
        model.load_state_dict(start_state["model"])
        opt.load_state_dict(start_state["optimizer"])
        set_implementation(opt, mode)
        generator.set_state(start_state["rng"]["data"])
        torch.set_rng_state(start_state["rng"]["torch"])
        step, elapsed = int(start_state["step"]), float(start_state["elapsed"])
        context.log(f"resuming {config.run_id} from {ckpt} at step {step}")
    wrapped = context.wrap(model)  # DDP over several ranks, the model itself in one process
    if mode == "fast":
        bucket = None if run_setup.task is None else run_setup.task.sequence_length(config.task.train_length) - 1
        train_step: Step = FastStep(model, opt, tc.grad_clip, bucket=bucket, context=context)
    else:
        train_step = ReferenceStep(model, wrapped, opt, tc.grad_clip, context)

    def snapshot() -> dict[str, Any]:
        return checkpoint_state(config, step, model, opt, generator, elapsed + (time.perf_counter() - start))

    start = time.perf_counter()
    wrapped.train()
    while step < tc.steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, tc)
        inputs, targets, mask, positions = training_batch(run_setup, generator)  # the global batch [B, s]
        count = float(targets.numel()) if mask is None else float(mask.sum())  # tokens scored in the global batch
        inputs, targets = inputs[rows].to(context.device), targets[rows].to(context.device)  # [B/N, s]
        mask = None if mask is None else mask[rows].to(context.device)
        positions = (positions[rows] if positions.dim() == 2 else positions).to(context.device)  # [B/N, s] | [s]
        try:
            loss = train_step(inputs, targets, mask, positions, count, f"step {step + 1}")  # the global mean loss
        except FloatingPointError as err:
            raise FloatingPointError(f"run {config.run_id}: {err} at step {step} (try a lower lr)") from None
        step += 1
        if context.is_main and (step % tc.checkpoint_every == 0 or step == tc.steps):
            save_checkpoint(ckpt, snapshot())
        if on_step is not None:
            on_step(step, tc.steps, float(loss))

    evaluation = evaluate_run(model.cpu(), run_setup)  # every rank: identical models, no collective
    record = result_record(config, evaluation, elapsed + time.perf_counter() - start, mode)
    if context.is_main:
        append_result(run_dir, record)
    return record, False


def load_trained(checkpoint: str | Path) -> tuple[RunConfig, Transformer, Setup]:
    """The config, model (eval mode) and setup stored in a run checkpoint."""
    state = load_checkpoint(Path(checkpoint))
    config = config_from_dict(state["config"])
    run_setup = setup(config)
    model = build_model(config, run_setup.vocab_size, run_setup.max_len)
    model.load_state_dict(state["model"])
    if state["step"] < config.train.steps:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} is of an unfinished run (step {state['step']} of "
            f"{config.train.steps}); run `posenc train` to finish it"
        )
    return config, model.eval(), run_setup


def evaluate_checkpoint(checkpoint: str | Path, eval_factors: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's checkpoint, at ``eval_factors`` x L when given (else
    the run's own lengths): a record with ``task``, ``encoding``, ``seed``,
    ``train_length`` and ``metrics``, as the tables read it. Corpora are scored on the
    run's own test segments (a longer layout would reach into its training text), so a
    length needs at most the context the run held out and must tile its segments."""
    config, model, run_setup = load_trained(checkpoint)
    if eval_factors is not None and run_setup.corpus is not None:
        L, test = config.task.train_length, run_setup.corpus.test
        lengths = sorted({f * L for f in eval_factors})
        if max(lengths) > test.context:
            raise ValueError(
                f"the run held out {test.context} tokens of context before each test segment; length "
                f"{max(lengths)} needs as many (train with eval_factors up to {max(lengths) // L} to score it)"
            )
        run_setup = dataclasses.replace(run_setup, eval_lengths=lengths)
    elif eval_factors is not None:
        config = dataclasses.replace(config, task=dataclasses.replace(config.task, eval_factors=tuple(eval_factors)))
        longer = setup(config)
        if longer.max_len > run_setup.max_len and config.model.encoding == "learned":
            raise ValueError(
                f"the learned encoding has {run_setup.max_len} positions; length {longer.max_len} does not exist"
            )
        run_setup = longer
    return {
        "task": config.task.label,
        "encoding": config.encoding_label,
        "seed": config.train.seed,
        "train_length": config.task.train_length,
        "metrics": evaluate_model(model, run_setup),
    }
