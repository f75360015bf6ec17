"""Figures that need a trained or a pretrained model, and the dispatcher of
``posenc plot``: the models are trained (``posenc.experiments.tiny``) or loaded
(``posenc.experiments.train.load_trained``, ``posenc.analysis.pretrained``) here, measured
with ``posenc.analysis.attention`` and drawn by ``posenc.viz.figures``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

import posenc
from posenc.analysis.attention import attention_weights
from posenc.analysis.pretrained import load_positions, minilm_dir
from posenc.experiments.tiny import copy_batch, train_tiny
from posenc.experiments.train import load_trained
from posenc.functional.checks import did_you_mean
from posenc.viz import figures, story_figures
from posenc.viz.figures import GLOBAL_KINDS, FigureUnavailable, TrainedAttention, save

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "GLOBAL_KINDS",
    "KINDS",
    "FigureUnavailable",
    "ALL_KINDS",
    "checkpoint_attention",
    "figure_maker",
    "plot",
    "pretrained",
    "save",
    "train_attention",
    "trained_attention",
]


def train_attention(encoding: str, *, steps: int = 300, half: int = 16, seed: int = 0) -> TrainedAttention:
    """Train a tiny causal LM ``steps`` steps on the copy task and measure its attention
    maps on one fresh copy sequence of ``2 * half`` tokens."""
    if encoding not in posenc.available():
        raise FigureUnavailable(f"encoding {encoding!r} is not registered")
    # normalized in a causal model divides by a fixed length: the longest input, 2 * half - 1 tokens
    params = {"length": 2 * half - 1} if encoding == "normalized" else None
    model, loss = train_tiny(encoding, steps=steps, half=half, seed=seed, encoding_params=params)
    seq = copy_batch(1, half, model.config.vocab_size, torch.Generator().manual_seed(seed + 1))[:, :-1]
    weights = attention_weights(model, seq)[:, 0]  # [layers, h, s, s]
    return TrainedAttention(encoding=encoding, steps=steps, loss=loss, weights=weights)


def trained_attention(encoding: str = "sinusoidal", *, steps: int = 300, half: int = 16, seed: int = 0) -> Figure:
    """Attention maps of a tiny causal LM trained ``steps`` steps on the copy task."""
    return figures.copy_attention(train_attention(encoding, steps=steps, half=half, seed=seed))


def checkpoint_attention(checkpoint: str, *, length: int | None = None, seed: int = 0) -> Figure:
    """Attention maps of a model trained by ``posenc train``/``posenc study`` (its
    checkpoint ``.pt``) on one example of its own task at ``length`` (default: the
    trained length)."""
    if not pathlib.Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r}")
    config, model, setup = load_trained(checkpoint)
    n = length or config.task.train_length
    gen = torch.Generator().manual_seed(seed)
    if setup.task is not None:
        tokens = setup.task.sample(n, 1, gen).tokens[:, :-1]  # [1, s] (the last token is only a target)
    else:
        tokens = setup.corpus.sample(n, 1, gen)[:, :-1]  # [1, n]
    weights = attention_weights(model, tokens)[:, 0]  # [layers, h, s, s]
    return figures.attention(weights, title=f"{pathlib.Path(checkpoint).stem}: attention at length {n}")


def pretrained(model_dir: str | None = None, *, name: str | None = None, horizon: int | None = None) -> Figure:
    """A pretrained model's learned position table (default model: all-MiniLM-L6-v2)."""
    try:
        path = minilm_dir() if model_dir is None else model_dir
    except FileNotFoundError as err:
        raise FigureUnavailable(str(err)) from None
    label = name or ("all-MiniLM-L6-v2" if model_dir is None else None)
    return story_figures.pretrained(load_positions(path), name=label, horizon=horizon)


#: Per-encoding kinds: viz's, and the attention maps of a tiny trained model.
KINDS = {**figures.KINDS, "attention": trained_attention}


#: Every kind of ``posenc plot``: per encoding, global, and a pretrained model's table.
ALL_KINDS = sorted([*KINDS, *GLOBAL_KINDS, "pretrained"])


def figure_maker(name: str, kind: str) -> tuple[Callable[..., Figure], tuple]:
    """``(function, positional args)`` that draws figure ``kind`` of ``name``: an
    encoding name, ``all`` (global kinds), a checkpoint ``*.pt`` (attention) or a model
    directory / ``minilm`` (pretrained). Unknown kinds list the kinds, with a suggestion."""
    if kind == "pretrained":
        return pretrained, (None if name.lower() in ("minilm", "all-minilm-l6-v2") else name,)
    if kind in GLOBAL_KINDS:
        return GLOBAL_KINDS[kind], () if kind == "scaling" else (None if name == "all" else [name],)
    if kind == "attention" and name.endswith(".pt"):
        return checkpoint_attention, (name,)
    if kind in KINDS:
        return KINDS[kind], (name,)
    raise ValueError(f"unknown kind {kind!r}; kinds: {ALL_KINDS}.{did_you_mean(kind, ALL_KINDS)}")


def plot(name: str, kind: str, **kwargs: Any) -> Figure:
    """The figure ``kind`` of ``name`` (see ``figure_maker``)."""
    make, args = figure_maker(name, kind)
    return make(*args, **kwargs)
