"""Run configuration: frozen dataclasses validated on creation, loaded from YAML.

A run is one model trained on one task with one encoding and one seed::

    task:   {name: copy, train_length: 16}
    model:  {encoding: sinusoidal, dim: 64, num_layers: 2, num_heads: 4}
    train:  {steps: 1000, batch_size: 32, lr: 0.001, seed: 0}

YAML is read with ``yaml.safe_load``; unknown keys and wrong types are errors that
name the key and the section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from posenc.data.synthetic import DEFAULT_MAX_COUNT, SYNTHETIC_TASKS, SyntheticTask
from posenc.data.text import CORPORA
from posenc.functional.checks import did_you_mean, positive_float, positive_int
from posenc.registry import get as get_encoding

TASKS: tuple[str, ...] = SYNTHETIC_TASKS + CORPORA
#: The seven steps of the classic story, in order (README), then the quick preset's others.
CLASSIC = ("integer", "normalized", "binary", "sine", "sinusoidal", "t5", "rope")
QUICK_ENCODINGS = (*CLASSIC, "learned", "alibi", "none")
#: Suffix of an encoding label trained with randomized positions (Ruoss et al. 2023): ``rope+randpos``.
RANDPOS = "+randpos"


def _positive_ints(name: str, values: tuple[int, ...]) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        positive_int(name, v)


def _lcm(values: list[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


#: Scored test tokens of a corpus run at least, by default (over ``eval_segments`` segments).
MIN_TEST_TOKENS = 65536


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The held-out layout of a corpus run (``CharCorpus.from_text`` keywords): ``segments``
    test segments of ``test_context + test_scored`` tokens, each followed by a validation
    segment of ``val_context + val_scored`` tokens (``*_scored``: per segment)."""

    segments: int
    test_context: int
    test_scored: int
    val_context: int
    val_scored: int


def sliding_stride(length: int, stride: int | None = None) -> int:
    """The stride of the sliding-window score at evaluation length ``length``: ``stride``
    when given, else ``length // 4`` (at least 1)."""
    return stride if stride is not None else max(1, length // 4)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What to learn and how to score it.

    ``name`` is a synthetic task (copy, reverse, duplicate, sort, recall, count) or a
    corpus (shakespeare, stdlib, text with ``text_path``).

    Synthetic tasks train on lengths ``1..train_length`` and are scored on
    ``eval_samples`` examples at each of ``synthetic_lengths``: every training length,
    three lengths inside ``(L, 2L)`` and ``eval_factors * L`` (default 2, 4, 8).

    Language models train on windows of ``train_length`` and report perplexity at
    ``eval_factors * L`` (default 1, 2, 4, 8, 16) on ``eval_segments`` held-out test
    segments spread evenly over the corpus, ``eval_tokens`` scored tokens in all (default:
    the smallest valid count >= 65536), each segment preceded by as many context tokens as
    the longest evaluation length. ``val_tokens`` (default: a quarter of ``eval_tokens``,
    rounded up to whole windows of ``L``) are scored at ``L`` in validation segments
    disjoint from the test segments; the learning rate is chosen on them, never on the
    test set. ``sliding_stride``: the stride of the sliding-window score at every length
    (default ``None``: ``E / 4`` at length ``E``, so every scored token sees at least
    ``3E / 4`` tokens of context and each length costs four times its non-overlapping score).
    """

    name: str = "copy"
    train_length: int = 16
    num_symbols: int = 16
    eval_factors: tuple[int, ...] | None = None
    eval_samples: int = 256
    text_path: str | None = None
    max_chars: int | None = None
    eval_tokens: int | None = None
    eval_segments: int = 16
    val_tokens: int | None = None
    sliding_stride: int | None = None

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(
                f"unknown task {self.name!r}; available: {list(TASKS)}.{did_you_mean(self.name, list(TASKS))}"
            )
        positive_int("train_length", self.train_length)
        positive_int("num_symbols", self.num_symbols)
        positive_int("eval_samples", self.eval_samples)
        positive_int("eval_segments", self.eval_segments)
        if self.eval_factors is not None:
            _positive_ints("eval_factors", self.eval_factors)
        for name in ("max_chars", "eval_tokens", "val_tokens", "sliding_stride"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.name == "text" and not self.text_path:
            raise ValueError("task 'text' needs text_path (a text file or folder)")
        if self.name != "text" and self.text_path:
            raise ValueError(f"text_path is only for task 'text', got it with task {self.name!r}")
        if self.is_lm:
            self.held_out()  # the divisibility checks, with errors that name the key to change

    def synthetic_task(self) -> SyntheticTask:
        """The generator of a synthetic task; ``count`` counts up to ``min(8, L)``, so
        every answer at every test length is an answer of training (``L = train_length``)."""
        return SyntheticTask(self.name, self.num_symbols, max_count=min(DEFAULT_MAX_COUNT, self.train_length))

    @property
    def is_lm(self) -> bool:
        return self.name in CORPORA

    @property
    def factors(self) -> tuple[int, ...]:
        if self.eval_factors is not None:
            return tuple(self.eval_factors)
        return (1, 2, 4, 8, 16) if self.is_lm else (2, 4, 8)

    @property
    def label(self) -> str:
        """The task name written to results (``text:<file name>`` for user text)."""
        return f"text:{Path(self.text_path).name}" if self.name == "text" else self.name

    # -- evaluation lengths and the held-out layout -----------------------------------------
    @property
    def synthetic_lengths(self) -> list[int]:
        """``1..L``, ``L + ceil(k L / 4)`` for k = 1, 2, 3 (inside ``(L, 2L)``; fewer when
        L < 4), and ``f L`` for every evaluation factor ``f``: sorted, distinct."""
        L = self.train_length
        inside = {L + -(-k * L // 4) for k in (1, 2, 3)}
        return sorted(set(range(1, L + 1)) | inside | {f * L for f in self.factors})

    @property
    def lm_lengths(self) -> list[int]:
        """``f L`` for every evaluation factor ``f``: sorted, distinct."""
        return sorted({f * self.train_length for f in self.factors})

    @property
    def stride(self) -> int | None:
        """The configured sliding-window stride (``None``: ``E / 4`` at each length ``E``)."""
        return self.sliding_stride

    @property
    def strides(self) -> list[int]:
        """The sliding-window stride at each of ``lm_lengths``."""
        return [sliding_stride(e, self.sliding_stride) for e in self.lm_lengths]

    def held_out(self) -> HeldOut:
        """The test and validation layout of a corpus run; ``ValueError`` naming the key
        when ``eval_tokens``/``val_tokens`` do not split into whole windows."""
        lengths, stride, k, L = self.lm_lengths, self.stride, self.eval_segments, self.train_length
        if stride is not None and stride > lengths[0]:
            raise ValueError(f"sliding_stride={stride} must be <= every evaluation length, got {lengths[0]}")
        unit = _lcm([*lengths, *self.strides])  # scored tokens per segment: a multiple of every length and stride
        test = self.eval_tokens if self.eval_tokens is not None else -(-MIN_TEST_TOKENS // (k * unit)) * k * unit
        if test % (k * unit):
            raise ValueError(
                f"eval_tokens={test} must split into eval_segments={k} segments of a multiple of {unit} tokens "
                f"(every evaluation length {lengths} and sliding_stride={stride}): use a multiple of {k * unit}"
            )
        val = self.val_tokens if self.val_tokens is not None else -(-test // (4 * k * L)) * k * L
        if val % (k * L):
            raise ValueError(
                f"val_tokens={val} must split into eval_segments={k} segments of a multiple of "
                f"train_length={L}: use a multiple of {k * L}"
            )
        return HeldOut(k, max(lengths), test // k, L, val // k)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Size of the ``posenc.Transformer`` (a causal decoder) and its encoding."""

    encoding: str = "sinusoidal"
    encoding_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        get_encoding(self.encoding)  # unknown names list the valid ones
        positive_int("dim", self.dim)
        positive_int("num_layers", self.num_layers)
        positive_int("num_heads", self.num_heads)
        positive_float("mlp_ratio", self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation. ``randomized_positions`` (Ruoss et al. 2023): each training
    sequence of ``s`` tokens gets ``s`` sorted distinct positions drawn uniformly from
    ``0..max_position-1`` instead of ``0..s-1`` (default ``max_position``: the longest
    evaluated sequence); such a run is scored both at ``0..s-1`` (the record's ``metrics``)
    and at randomized test positions drawn the same way (``metrics_random``, as Ruoss et
    al. evaluate; ``posenc.experiments.evaluate``). ``init_from``: the checkpoint
    of a finished run whose model weights start this run (fine-tuning, e.g. ``posenc
    extend``); the encoding's parameters may differ, the weights' shapes must not."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    randomized_positions: bool = False
    max_position: int | None = None
    checkpoint_every: int = 100
    threads: int | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        positive_int("batch_size", self.batch_size)
        positive_float("lr", self.lr)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        positive_float("weight_decay", self.weight_decay, inclusive=True)
        positive_float("grad_clip", self.grad_clip)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        positive_int("checkpoint_every", self.checkpoint_every)
        for name in ("max_position", "threads"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"init_from must be a checkpoint path, got {self.init_from!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run: task, model and training."""

    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    @property
    def encoding_label(self) -> str:
        """The encoding name written to results: ``<name>+randpos`` with randomized positions."""
        return self.model.encoding + (RANDPOS if self.train.randomized_positions else "")

    @property
    def run_id(self) -> str:
        """Stable id: task, encoding, length, seed and a hash of the whole config.

        ``threads`` is left out of the hash: it changes speed, not what is computed;
        ``init_from`` only when unset (so ids of runs from scratch did not change when
        it was added).
        """
        d = self.to_dict()
        d["train"].pop("threads", None)
        if d["train"].get("init_from") is None:
            d["train"].pop("init_from", None)
        digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
        task = self.task.label.replace(":", "-").replace("/", "-")
        return f"{task}__{self.encoding_label}__L{self.task.train_length}__s{self.train.seed}__{digest}"


# -- what the train section leaves implicit -----------------------------------------------


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers, e.g. ``(train.seed, stream)``: each random
    stream of a run (model initialization, training data, the examples of each evaluation
    length) gets its own seed, so none depends on how much another one drew."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B9)) * 1099511628211) % (1 << 63)
    return h


def default_threads(cores: int | None = None) -> int:
    """The torch threads of a run whose ``train.threads`` is None: ``min(2, cores)``
    (``cores``: this machine's, ``os.cpu_count()``, unless given)."""
    return max(1, min(2, cores if cores is not None else os.cpu_count() or 1))


# -- strict loading from dicts / YAML ---------------------------------------------------


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` (int, float, bool, str, dict, tuple[int, ...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(where, value, inner)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}")
        (inner, _) = typing.get_args(hint)
        return tuple(_check_type(f"{where}[{i}]", v, inner) for i, v in enumerate(value))
    raise AssertionError(f"unsupported config type {hint!r}")  # internal invariant


def _build(cls: type, data: Any, section: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"config section {section!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section {section!r}; valid keys: {names}")
    kwargs = {}
    for key, value in data.items():
        where = f"{section}.{key}" if section != "(top level)" else key
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, key)
        else:
            kwargs[key] = _check_type(where, value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: Any) -> RunConfig:
    """A validated ``RunConfig`` from a nested dict; unknown keys raise ``ValueError``."""
    return _build(RunConfig, data if data is not None else {}, "(top level)")


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config (``yaml.safe_load``) and validate it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from None
    return config_from_dict(data)


def replace(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` with fields of its sections replaced:
    ``replace(cfg, train={"seed": 1}, model={"encoding": "rope"})``."""
    d = config.to_dict()
    for section, values in sections.items():
        if section not in d:
            raise ValueError(f"unknown config section {section!r}; valid: {list(d)}")
        d[section].update(values)
    return config_from_dict(d)
