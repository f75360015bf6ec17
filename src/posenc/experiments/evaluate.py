"""Scoring a trained model past its training length, with counts that intervals need.

Synthetic tasks: exact match and per-token accuracy on the answer tokens, with teacher
forcing (the argmax at every answer position given the true prefix), and their integer
hit counts. Exact match under teacher forcing equals exact match of greedy decoding for
a causal model whose encoding does not depend on the final length: greedy decoding goes
wrong exactly at the first answer token whose teacher-forced argmax is wrong.

Language modelling (Press et al. 2022, appendix B): the test set is ``k`` held-out
segments spread over the corpus (``CharCorpus.test``), each ``C`` context tokens (the
longest evaluation length) then ``T`` scored tokens, the *same* scored tokens at every
evaluation length ``E``:

* non-overlapping: each segment's ``T`` tokens are cut into ``T / E`` chunks of ``E``;
  every token is predicted from the tokens before it in its chunk (context 0..E-1);
* sliding window with stride ``S``: windows of ``E`` tokens advance by ``S`` and score
  only their last ``S`` tokens, so every token sees at least ``E - S`` tokens of
  context (``S = 1`` is the paper's setting; larger ``S`` is cheaper).

Each length's entry keeps the summed NLL of every segment, so a block bootstrap over
segments (``stats.ppl_ci``) can be recomputed from the record.

Length-dependent encodings (``model.pe.length_dependent``: dynamic NTK, LongRoPE,
``normalized`` without a fixed length): a full forward gives every token the encoding of
the *final* length, which decoding never has. Their predictions are made prefix by
prefix: synthetic answers through the model's exact KV cache (``model.new_cache()``,
the true previous token fed at each step), corpus tokens from a forward of their own
prefix of the window, one forward per distinct ``frequency_state`` (one for every prefix
up to a rule's threshold, then one per token for dynamic NTK and ``normalized``).

Randomized positions (Ruoss et al. 2023, whose evaluation also draws positions, as at
training time): with ``max_position`` each sequence or window gets sorted distinct
positions drawn uniformly from ``0..max_position-1`` from its own seeded stream.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from posenc.data.synthetic import Example, SyntheticTask
from posenc.data.text import CharCorpus, Segments
from posenc.experiments.config import derive_seed, sliding_stride
from posenc.functional.checks import positive_int
from posenc.model import Transformer

#: ``derive_seed(seed, n, stream)`` seeds the examples of length ``n`` of each set.
TEST_STREAM = 7
VALIDATION_STREAM = 11
#: ``derive_seed(seed, n, stream, POSITION_STREAM)`` seeds the randomized test positions.
POSITION_STREAM = 13
#: Tokens per forward when scoring a corpus (rows = BATCH_TOKENS // E).
BATCH_TOKENS = 1024
#: Rows per draw of randomized positions (the draws do not depend on the forward batch).
_DRAW_ROWS = 256


def random_positions(batch: int, length: int, max_position: int, generator: torch.Generator) -> torch.Tensor:
    """Ruoss et al. 2023: ``[batch, length]`` sorted distinct positions drawn uniformly
    from ``0..max_position-1`` (one draw per sequence)."""
    if length > max_position:
        raise ValueError(f"cannot draw {length} distinct positions below max_position={max_position}")
    scores = torch.rand(batch, max_position, generator=generator)  # [b, M]
    return scores.argsort(dim=1)[:, :length].sort(dim=1).values  # [b, length]


def _draw_positions(rows: int, length: int, max_position: int, generator: torch.Generator) -> torch.Tensor:
    """``random_positions`` for ``rows`` rows drawn ``_DRAW_ROWS`` at a time: ``[rows, length]``."""
    parts = [
        random_positions(min(_DRAW_ROWS, rows - i), length, max_position, generator) for i in range(0, rows, _DRAW_ROWS)
    ]
    return torch.cat(parts) if parts else torch.empty(0, length, dtype=torch.long)


def is_length_dependent(model: nn.Module) -> bool:
    """True for a posenc ``Transformer`` whose built encoding depends on the length."""
    return isinstance(model, Transformer) and bool(model.pe.length_dependent)


# -- synthetic tasks --------------------------------------------------------------------------


@torch.no_grad()
def cached_logits(
    model: Transformer, inputs: torch.Tensor, positions: torch.Tensor | None, prompt: int
) -> torch.Tensor:
    """Logits ``[b, s - prompt + 1, vocab]`` at input indices ``prompt - 1 .. s - 1`` of
    ``inputs [b, s]`` (positions ``[s]``/``[b, s]`` or None), each from its own true
    prefix: the prompt in one call, then one true token per call through the model's
    exact KV cache (``model.new_cache()``), which equals a full forward of each prefix."""
    positive_int("prompt", prompt)
    cache = model.new_cache()
    pos = None if positions is None else positions[..., :prompt]
    out = [model(inputs[:, :prompt], pos, cache=cache)[:, -1]]  # [b, vocab]: predicts token `prompt`
    for t in range(prompt, inputs.shape[1]):  # feed the true token t, predict token t + 1
        pos = None if positions is None else positions[..., t : t + 1]
        out.append(model(inputs[:, t : t + 1], pos, cache=cache)[:, -1])
    return torch.stack(out, dim=1)


def answer_hits(pred: torch.Tensor, ex: Example) -> tuple[int, int, int]:
    """``(exact, correct, total)`` of predictions ``pred [b, s-1]`` (``pred[:, t]``
    predicts token ``t + 1``) on the answers of ``ex``: examples whose every answer token
    is right, right answer tokens, answer tokens."""
    target, mask = ex.tokens[:, 1:], ex.answer_mask[:, 1:]  # [b, s-1]
    hit = (pred == target) | ~mask
    return int(hit.all(dim=1).sum()), int(((pred == target) & mask).sum()), int(mask.sum())


def hit_rates(exact: int, correct: int, total: int, samples: int) -> dict[str, float | int]:
    """A synthetic metrics entry's scores and the counts behind them."""
    return {
        "exact_match": exact / samples,
        "token_accuracy": correct / total,
        "samples": samples,
        "exact_hits": exact,
        "tokens": total,
        "token_hits": correct,
    }


@torch.no_grad()
def synthetic_metrics(
    model: nn.Module,
    task: SyntheticTask,
    lengths: list[int],
    *,
    samples: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    max_position: int | None = None,
    prefix_consistent: bool | None = None,
    stream: int = TEST_STREAM,
) -> list[dict[str, float | int]]:
    """``[{"length", "exact_match", "token_accuracy", "samples", "exact_hits", "tokens",
    "token_hits"}]`` at each length ``n`` (hits: integer counts; ``tokens``: answer tokens).

    The examples at length ``n`` depend only on ``(seed, n, stream)``, so every encoding
    and every resumed run is scored on the same examples. ``max_position``: randomized
    test positions (Ruoss et al. 2023) from the stream ``(seed, n, stream,
    POSITION_STREAM)``, the examples unchanged. ``prefix_consistent`` (default: the
    model's encoding is length dependent): predict through the KV cache.
    """
    positive_int("samples", samples)
    if prefix_consistent is None:
        prefix_consistent = is_length_dependent(model)
    was_training = model.training
    model.eval()
    out = []
    for n in lengths:
        gen = torch.Generator().manual_seed(derive_seed(seed, n, stream))
        pos_gen = torch.Generator().manual_seed(derive_seed(seed, n, stream, POSITION_STREAM))
        exact = correct = total = 0
        left = samples
        while left:
            b = min(left, batch_size)
            left -= b
            ex = task.sample(n, b, gen)
            inputs = ex.tokens[:, :-1]  # [b, s-1]: position t predicts token t+1
            positions = None
            if max_position is not None:
                positions = random_positions(b, inputs.shape[1], max_position, pos_gen)  # [b, s-1]
            if prefix_consistent:
                prompt = int(ex.answer_mask[0].nonzero()[0])  # index of the first answer token
                pred = torch.full(inputs.shape, -1, dtype=torch.long)  # [b, s-1]; -1: prompt, unscored
                pred[:, prompt - 1 :] = cached_logits(model, inputs, positions, prompt).argmax(-1)
            else:
                pred = model(inputs, positions).argmax(-1)  # [b, s-1]
            exact, correct, total = (a + c for a, c in zip((exact, correct, total), answer_hits(pred, ex), strict=True))
        out.append({"length": n, **hit_rates(exact, correct, total, samples)})
    model.train(was_training)
    return out


def synthetic_validation(
    model: nn.Module,
    task: SyntheticTask,
    train_length: int,
    *,
    samples: int,
    seed: int,
    max_position: int | None = None,
) -> dict[str, Any]:
    """In-distribution validation: exact match pooled over ``samples`` fresh examples at
    every length ``1..train_length``, drawn from ``VALIDATION_STREAM`` (never the test
    examples' stream). At small ``n`` the example space is small (e.g. 32 sequences of
    copy at n = 1), so the same sequences occur in training, validation and test alike."""
    rows = synthetic_metrics(
        model,
        task,
        list(range(1, train_length + 1)),
        samples=samples,
        seed=seed,
        max_position=max_position,
        stream=VALIDATION_STREAM,
    )
    hits, size = sum(r["exact_hits"] for r in rows), sum(r["samples"] for r in rows)
    return {"metric": "exact_match", "value": hits / size, "higher_is_better": True, "size": size}


# -- language modelling -------------------------------------------------------------------------


def _prefix_logits(model: Transformer, inputs: torch.Tensor, positions: torch.Tensor, score_from: int):
    """Logits ``[n, E - score_from, vocab]`` of ``inputs [n, E]`` at ``score_from..E-1``,
    each from a forward of its own prefix. Prefixes whose encoding ``frequency_state``
    is the same share one forward (the longest of them): causal attention makes the
    earlier outputs of that forward equal their own prefixes' outputs."""
    E = inputs.shape[1]
    top = positions if positions.dim() == 1 else positions.max(dim=0).values  # [E] batch-wide, as the model
    top = top.cummax(0).values  # [E] the largest position of each prefix
    groups: dict[Any, list[int]] = {}
    for i in range(score_from, E):
        groups.setdefault(model.pe.frequency_state(int(top[i]) + 1), []).append(i)
    out = torch.empty(inputs.shape[0], E - score_from, model.config.vocab_size)
    for idx in groups.values():
        m = idx[-1] + 1
        logits = model(inputs[:, :m], positions[..., :m])  # [n, m, vocab]
        out[:, [i - score_from for i in idx]] = logits[:, idx].float()
    return out


def _rows_nll(
    model: nn.Module, windows: torch.Tensor, positions: torch.Tensor | None, score: int, prefix_consistent: bool
) -> torch.Tensor:
    """Summed NLL ``[n]`` (float64) of the last ``score`` targets of each window ``[n, E+1]``
    (inputs ``[:, :-1]``, targets ``[:, 1:]``); ``positions`` ``[n, E]`` or None."""
    inputs, targets = windows[:, :-1], windows[:, 1:]  # [n, E]
    E = inputs.shape[1]
    if prefix_consistent:
        pos = positions if positions is not None else torch.arange(E)
        logits = _prefix_logits(model, inputs, pos, E - score)  # [n, score, vocab]
    else:
        logits = model(inputs, positions)[:, -score:].float()  # [n, score, vocab]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, -score:], reduction="none")  # [n, score]
    return nll.double().sum(dim=1)


def _segment_nll(
    model: nn.Module,
    segments: Segments,
    length: int,
    stride: int,
    *,
    generator: torch.Generator | None,
    max_position: int | None,
    prefix_consistent: bool,
) -> list[float]:
    """Summed NLL of every segment's scored tokens at window ``length``: windows advance by
    ``stride`` and score their last ``stride`` tokens (``stride == length``:
    non-overlapping chunks)."""
    C, T, k = segments.context, segments.scored, segments.count
    if T % stride or stride > length or C < length:
        raise ValueError(
            f"windows of {length} with stride {stride} do not tile {T} scored tokens after {C} tokens of "
            "context (build the corpus from the run's TaskConfig.held_out)"
        )
    ends = C + stride * torch.arange(1, T // stride + 1)  # [w] one past each window's last scored token
    idx = ends[:, None] - length - 1 + torch.arange(length + 1)  # [w, E+1]
    windows = segments.tokens[:, idx].reshape(-1, length + 1)  # [k * w, E+1], segment-major
    positions = None
    if max_position is not None:
        positions = _draw_positions(len(windows), length, max_position, generator)  # [k * w, E]
    rows = max(1, BATCH_TOKENS // length)
    nll = torch.cat(
        [
            _rows_nll(
                model,
                windows[i : i + rows],
                None if positions is None else positions[i : i + rows],
                stride,
                prefix_consistent,
            )
            for i in range(0, len(windows), rows)
        ]
    )  # [k * w]
    return nll.reshape(k, -1).sum(dim=1).tolist()  # [k]


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    corpus: CharCorpus,
    lengths: list[int],
    *,
    stride: int | None = None,
    max_position: int | None = None,
    seed: int = 0,
    prefix_consistent: bool | None = None,
) -> list[dict[str, Any]]:
    """``[{"length", "ppl", "ppl_sliding", "tokens", "segment_tokens", "nll_segments",
    "nll_sliding_segments"}]`` on ``corpus.test`` at every length: perplexity
    non-overlapping and with a sliding window of stride ``stride`` (``None``: ``E / 4`` at
    length ``E``, ``config.sliding_stride``), and each segment's
    summed NLL (``ppl = exp(sum(nll_segments) / tokens)``).

    ``max_position``: randomized positions (Ruoss et al. 2023) per window, from the
    stream ``(seed, E, kind, POSITION_STREAM)``. ``prefix_consistent`` (default: the
    model's encoding is length dependent): every token from a forward of its own prefix.
    """
    if stride is not None:
        positive_int("stride", stride)
    if prefix_consistent is None:
        prefix_consistent = is_length_dependent(model)
    test = corpus.test
    if max(lengths) > test.context:
        raise ValueError(
            f"the test segments hold {test.context} tokens of context; length {max(lengths)} needs as many "
            "(build the corpus from the run's TaskConfig.held_out)"
        )
    was_training = model.training
    model.eval()
    out = []
    for e in lengths:
        if stride is not None and e < stride:
            raise ValueError(f"sliding_stride={stride} must be <= every evaluation length, got {e}")
        sums = []
        for kind, step in enumerate((e, sliding_stride(e, stride))):  # non-overlapping, then sliding
            gen = torch.Generator().manual_seed(derive_seed(seed, e, kind, POSITION_STREAM))
            sums.append(
                _segment_nll(
                    model,
                    test,
                    e,
                    step,
                    generator=gen,
                    max_position=max_position,
                    prefix_consistent=prefix_consistent,
                )
            )
        tokens = test.scored * test.count
        out.append(
            {
                "length": e,
                "ppl": math.exp(sum(sums[0]) / tokens),
                "ppl_sliding": math.exp(sum(sums[1]) / tokens),
                "tokens": tokens,
                "segment_tokens": test.scored,
                "sliding_stride": sliding_stride(e, stride),
                "nll_segments": sums[0],
                "nll_sliding_segments": sums[1],
            }
        )
    model.train(was_training)
    return out


@torch.no_grad()
def lm_validation(
    model: nn.Module,
    corpus: CharCorpus,
    train_length: int,
    *,
    max_position: int | None = None,
    seed: int = 0,
    prefix_consistent: bool | None = None,
) -> dict[str, Any]:
    """In-distribution validation: non-overlapping perplexity at ``train_length`` on
    ``corpus.validation`` (segments disjoint from the test segments and from training)."""
    if prefix_consistent is None:
        prefix_consistent = is_length_dependent(model)
    val = corpus.validation
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(derive_seed(seed, train_length, VALIDATION_STREAM, POSITION_STREAM))
    nll = _segment_nll(
        model,
        val,
        train_length,
        train_length,
        generator=gen,
        max_position=max_position,
        prefix_consistent=prefix_consistent,
    )
    model.train(was_training)
    size = val.scored * val.count
    return {"metric": "ppl", "value": math.exp(sum(nll) / size), "higher_is_better": False, "size": size}
