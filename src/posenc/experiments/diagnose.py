"""Mechanism probes: why a trained model fails past the length it was trained on.

Three explanations from the literature, each isolated by one evaluation-time
intervention (``posenc.attention.Intervention``: the same mask or scale for every
encoding and attention backend, no special case per encoding):

* unseen positions (Ruoss et al. 2023): ``shifted`` scores inputs of the training
  length ``L`` whose positions are offset by ``T(E) - T(L)``, so the model sees the
  positions of the end of a length-``E`` input, but no longer distance and no more keys;
* unseen distances (Press et al. 2022; the relative buckets of Raffel et al. 2020):
  ``window`` scores length ``E`` with every query restricted to its last ``W = T(L)``
  keys, so every query-key distance and every key count is one seen in training (it
  removes unseen distances and attention dilution together);
* attention dilution (Chiang & Cholak 2022; Wang et al. 2024 on NoPE; the log-length
  factor of YaRN, Peng et al. 2023, and of scalable softmax, Nakanishi 2025):
  ``temperature`` scores length ``E`` with the whole pre-softmax score (``q kᵀ / sqrt(d)``
  plus any encoding bias) multiplied by ``log T(E) / log T(L)``; ``window_temperature``
  applies both.

``T(n)`` is the number of input tokens of an example of length ``n`` (synthetic tasks:
``BOS``, input, ``SEP`` and the answer minus the last token, ``sequence_length(n) - 1``;
corpora: ``n``), so ``W = T(L)`` is the longest sequence seen in training. Per layer and
head, ``attention`` holds the mean entropy (nats) of the attention rows of the scored
queries and their mean mass on the nearest ``W`` keys, at ``L`` and at each ``E``
without intervention.

Synthetic tasks are scored on the main evaluation's seeded test examples
(``posenc.experiments.evaluate.synthetic_metrics``: stream ``derive_seed(seed, n,
TEST_STREAM)``, drawn 64 at a time), the first ``samples`` of them, the same examples
under every condition; corpora on its test segments (``CharCorpus.test``), as its
non-overlapping perplexity. An encoding that depends on the length (``Setup.length_dependent``)
is scored prefix by prefix, as the main evaluation does; its attention statistics come
from one full forward per input. Positions are ``0..s-1`` (plus the offset), also for
runs trained with randomized positions. Evaluation only: no weight changes.

Shapes: tokens ``[b, s]``; attention probabilities ``[b, h, s_q, s_k]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from posenc.attention import Intervention
from posenc.data.synthetic import Example, SyntheticTask
from posenc.experiments.config import derive_seed
from posenc.experiments.evaluate import BATCH_TOKENS, TEST_STREAM, answer_hits, hit_rates
from posenc.functional.checks import positive_int

#: Version of the ``probes`` dict; bumped when its keys or their meaning change.
PROBES_VERSION = 1
#: The conditions scored at every test length ``E`` (``none``: no intervention).
CONDITIONS = ("none", "shifted", "window", "temperature", "window_temperature")
#: Examples are drawn this many at a time, as in ``synthetic_metrics`` (same stream, same examples).
EVAL_BATCH = 64
_DIGITS = 6  # attention statistics
_NLL_DIGITS = 4  # summed NLLs (nats): an error below 5e-5 nats per segment


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of every attention row, ``-sum_j p_j log p_j`` (``0 log 0 = 0``).

    ``probs [..., s_q, s_k]`` (rows sum to 1) -> ``[..., s_q]``."""
    return torch.special.entr(probs.float()).sum(-1)


def near_keys(query_index: torch.Tensor, s_k: int, window: int) -> torch.Tensor:
    """Bool ``[n, s_k]``: the keys ``j`` with ``|i - j| < window`` of each query at key
    index ``i`` (``query_index [n]``); for a causal model its last ``window`` keys."""
    kj = torch.arange(s_k, device=query_index.device)[None, :]  # [1, s_k]
    return (query_index[:, None] - kj).abs() < window  # [n, s_k]


def near_mass(probs: torch.Tensor, window: int) -> torch.Tensor:
    """Attention mass of every row on its nearest ``window`` keys: the keys ``j`` with
    ``|past + i - j| < window`` for query ``i`` (``past = s_k - s_q``; for a causal model the
    last ``window`` keys, itself included).

    ``probs [..., s_q, s_k]`` -> ``[..., s_q]``."""
    positive_int("window", window)
    s_q, s_k = probs.shape[-2:]
    near = near_keys(torch.arange(s_k - s_q, s_k, device=probs.device), s_k, window)  # [s_q, s_k]
    return (probs.float() * near).sum(-1)


class AttentionStats:
    """An ``Intervention.observe`` callable: sums, per layer and head, the entropy and the
    near-key mass of the rows of the scored queries (``rows [b, s_q]`` bool, set before
    each forward) and the log of each scored query's number of visible keys (the entropy
    of uniform attention)."""

    def __init__(self, model: nn.Module, window: int) -> None:
        self.layer = {id(block.attn): i for i, block in enumerate(model.blocks)}
        layers, heads = len(model.blocks), model.blocks[0].attn.num_heads
        self.window = positive_int("window", window)
        self.entropy = torch.zeros(layers, heads, dtype=torch.float64)
        self.mass = torch.zeros(layers, heads, dtype=torch.float64)
        self.queries = torch.zeros(layers, dtype=torch.long)
        self.uniform = 0.0
        self.rows: torch.Tensor | None = None

    def __call__(self, module: nn.Module, probs: torch.Tensor) -> None:
        i = self.layer[id(module)]
        s_q, s_k = probs.shape[-2:]
        rows = self.rows.to(probs.device)  # [b, s_q]
        picked = probs.transpose(1, 2)[rows].float()  # [n, h, s_k]: the scored queries' rows
        at = rows.nonzero()[:, 1] + (s_k - s_q)  # [n]: each scored query's key index
        near = near_keys(at, s_k, self.window)  # [n, s_k]
        self.entropy[i] += attention_entropy(picked).double().sum(0)  # [h]
        self.mass[i] += (picked * near[:, None, :]).sum(-1).double().sum(0)  # [h]
        self.queries[i] += len(at)
        if i == 0:
            visible = (at + 1).double() if module.causal else torch.full((len(at),), float(s_k))  # [n]
            self.uniform += float(visible.log().sum())

    def summary(self, length: int, tokens: int) -> dict[str, Any]:
        """The means: ``entropy`` and ``near_mass`` ``[layer][head]``, ``uniform_entropy``."""
        n = self.queries.clamp_min(1).double()[:, None]  # [layers, 1]
        return {
            "length": length,
            "tokens": tokens,
            "queries": int(self.queries[0]),
            "uniform_entropy": round(self.uniform / max(1, int(self.queries[0])), _DIGITS),
            "entropy": _rounded(self.entropy / n),
            "near_mass": _rounded(self.mass / n),
        }


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), _DIGITS) for v in row] for row in t]


# -- lengths and factors ------------------------------------------------------------------


def input_tokens(run_setup: Any, n: int) -> int:
    """``T(n)``: input tokens of an example of length ``n`` (corpora: ``n``)."""
    return n if run_setup.task is None else run_setup.task.sequence_length(n) - 1


def probe_lengths(run_setup: Any) -> list[int]:
    """The probed lengths ``E = f L`` for the run's evaluation factors ``f > 1``."""
    L = run_setup.config.task.train_length
    return sorted({f * L for f in run_setup.config.task.factors if f > 1})


def temperature(run_setup: Any, length: int) -> float:
    """``log T(E) / log T(L)``: the ratio of the log key counts of the longest query at
    ``E`` and at ``L`` (YaRN's and scalable softmax's log-length scaling, as a ratio)."""
    t_l = input_tokens(run_setup, run_setup.config.task.train_length)
    if t_l < 2:
        raise ValueError(f"the temperature log T(E) / log T(L) needs T(L) >= 2 input tokens, got {t_l}")
    return math.log(input_tokens(run_setup, length)) / math.log(t_l)


def interventions(run_setup: Any, length: int) -> dict[str, Intervention]:
    """The ``Intervention`` of every condition at test length ``length`` (``CONDITIONS``);
    ``shifted`` applies to inputs of the training length."""
    L = run_setup.config.task.train_length
    window = input_tokens(run_setup, L)
    tau = temperature(run_setup, length)
    return {
        "none": Intervention(),
        "shifted": Intervention(offset=input_tokens(run_setup, length) - window),
        "window": Intervention(window=window),
        "temperature": Intervention(temperature=tau),
        "window_temperature": Intervention(window=window, temperature=tau),
    }


# -- synthetic tasks ------------------------------------------------------------------------


def probe_examples(task: SyntheticTask, n: int, samples: int, seed: int) -> list[Example]:
    """The first ``samples`` test examples of length ``n`` of the main evaluation (its
    stream ``derive_seed(seed, n, TEST_STREAM)``, drawn ``EVAL_BATCH`` at a time)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, n, TEST_STREAM))
    out, left = [], positive_int("samples", samples)
    while left:
        b = min(left, EVAL_BATCH)
        left -= b
        out.append(task.sample(n, b, gen))
    return out


def _predictions(model, inputs: torch.Tensor, prompt: int, iv: Intervention, prefix_consistent: bool):
    """Argmax predictions ``[b, s]`` of ``inputs [b, s]`` under ``iv``: one forward, or
    (``prefix_consistent``: length-dependent encodings, as the main evaluation) each from
    its own true prefix through the exact KV cache, from ``prompt - 1`` on."""
    if not prefix_consistent:
        return model(inputs, intervention=iv).argmax(-1)  # [b, s]
    cache = model.new_cache()
    pred = torch.full(inputs.shape, -1, dtype=torch.long)  # [b, s]
    pred[:, prompt - 1] = model(inputs[:, :prompt], cache=cache, intervention=iv)[:, -1].argmax(-1)
    for t in range(prompt, inputs.shape[1]):  # feed the true token t, predict token t + 1
        pred[:, t] = model(inputs[:, t : t + 1], cache=cache, intervention=iv)[:, -1].argmax(-1)
    return pred


@torch.no_grad()
def score_examples(
    model: nn.Module,
    batches: list[Example],
    intervention: Intervention | None = None,
    *,
    prefix_consistent: bool = False,
) -> dict[str, Any]:
    """Teacher-forced exact match and token accuracy on the answer tokens, with integer
    hit counts: ``{"exact_match", "token_accuracy", "samples", "exact_hits", "tokens",
    "token_hits"}`` (the main evaluation's scoring, ``evaluate.synthetic_metrics``)."""
    iv = intervention or Intervention()
    exact = correct = total = samples = 0
    for ex in batches:
        inputs = ex.tokens[:, :-1]  # [b, s-1]: position t predicts token t+1
        prompt = int(ex.answer_mask[0].nonzero()[0])  # index of the first answer token
        pred = _predictions(model, inputs, prompt, iv, prefix_consistent)  # [b, s-1]
        exact, correct, total = (a + c for a, c in zip((exact, correct, total), answer_hits(pred, ex), strict=True))
        samples += ex.tokens.shape[0]
    return hit_rates(exact, correct, total, samples)


def _first(batches: list[Example], n: int) -> list[Example]:
    """The first ``n`` examples of ``batches``, in the same batches (the last one cut)."""
    out = []
    for ex in batches:
        if n <= 0:
            break
        out.append(Example(ex.tokens[:n], ex.answer_mask[:n]))  # [min(b, n), s]
        n -= ex.tokens.shape[0]
    return out


@torch.no_grad()
def _synthetic_attention(model, batches: list[Example], window: int, length: int, tokens: int) -> dict:
    stats = AttentionStats(model, window)
    for ex in batches:
        stats.rows = ex.answer_mask[:, 1:]  # [b, s-1]: the queries that predict an answer token
        model(ex.tokens[:, :-1], intervention=Intervention(observe=stats))
    return stats.summary(length, tokens)


def _synthetic_probes(model, run_setup, samples: int, attention_samples: int) -> dict[str, Any]:
    task, seed = run_setup.task, run_setup.config.train.seed
    L = run_setup.config.task.train_length
    window = input_tokens(run_setup, L)
    consistent = bool(run_setup.length_dependent)
    at_l = probe_examples(task, L, samples, seed)
    few = min(samples, attention_samples)
    out: dict[str, Any] = {
        "reference": {"length": L, **score_examples(model, at_l, prefix_consistent=consistent)},
        "lengths": [],
        "attention": [_synthetic_attention(model, _first(at_l, few), window, L, window)],
    }
    for e in probe_lengths(run_setup):
        batches = probe_examples(task, e, samples, seed)
        conditions = interventions(run_setup, e)
        entry = {"length": e, "tokens": input_tokens(run_setup, e), "tau": round(temperature(run_setup, e), 9)}
        entry["offset"] = conditions["shifted"].offset
        for name, iv in conditions.items():
            examples = at_l if name == "shifted" else batches
            entry[name] = score_examples(model, examples, iv, prefix_consistent=consistent)
        out["lengths"].append(entry)
        out["attention"].append(
            _synthetic_attention(model, _first(batches, few), window, e, input_tokens(run_setup, e))
        )
    out["samples"] = samples
    out["attention_samples"] = few
    return out


# -- corpora ---------------------------------------------------------------------------------


def lm_segments(run_setup: Any) -> list[torch.Tensor]:
    """The main evaluation's test segments (``CharCorpus.test``), each cut to its scored
    tokens plus the one token before them (the first prediction's input): ``[T + 1]``."""
    test = run_setup.corpus.test
    return [row[test.context - 1 :] for row in test.tokens]  # k x [T + 1]


def _chunk_logits(model, inputs: torch.Tensor, iv: Intervention, prefix_consistent: bool) -> torch.Tensor:
    """Logits ``[n, E, vocab]`` (float32) of ``inputs [n, E]`` under ``iv``: one forward,
    or (``prefix_consistent``) each token from a forward of its own prefix, prefixes with
    the same encoding ``frequency_state`` sharing one forward (as the main evaluation)."""
    if not prefix_consistent:
        return model(inputs, intervention=iv).float()
    E = inputs.shape[1]
    groups: dict[Any, list[int]] = {}
    for i in range(E):  # the positions the model sees are i + offset
        groups.setdefault(model.pe.frequency_state(i + iv.offset + 1), []).append(i)
    out = torch.empty(inputs.shape[0], E, model.config.vocab_size)
    for idx in groups.values():
        m = idx[-1] + 1
        out[:, idx] = model(inputs[:, :m], intervention=iv)[:, idx].float()  # causal: prefix outputs
    return out


@torch.no_grad()
def score_segments(
    model: nn.Module,
    segments: list[torch.Tensor],
    length: int,
    intervention: Intervention | None = None,
    *,
    prefix_consistent: bool = False,
    stats: AttentionStats | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Non-overlapping perplexity at ``length``: each segment ``[T + 1]`` is cut into
    ``T / length`` chunks, every token predicted from the tokens before it in its chunk.
    ``{"ppl", "nll", "tokens", "segment_tokens", "nll_segments"}`` (NLL summed, nats,
    rounded to 4 decimals).
    With ``stats``, only the first ``limit`` chunks of the first segment, in one plain
    forward each, feed it (the attention statistics)."""
    iv = intervention or Intervention()
    rows = max(1, BATCH_TOKENS // length)  # chunks per forward, as the main evaluation
    sums = []
    for seg in segments:
        t = len(seg) - 1
        if t % length:
            raise ValueError(f"a segment of {t} scored tokens is not a multiple of length {length}")
        starts = torch.arange(0, t, length)[:limit]  # [T/E]
        nll = 0.0
        for i in range(0, len(starts), rows):
            chunk = seg[starts[i : i + rows, None] + torch.arange(length + 1)]  # [n, E+1]
            if stats is not None:
                stats.rows = torch.ones(chunk.shape[0], length, dtype=torch.bool)  # every query is scored
                logits = model(chunk[:, :-1], intervention=Intervention(observe=stats)).float()
            else:
                logits = _chunk_logits(model, chunk[:, :-1], iv, prefix_consistent)  # [n, E, vocab]
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")  # [n, E]
            nll += float(loss.double().sum())
        sums.append(nll)
        if stats is not None:
            break
    per_segment = len(starts) * length
    return {
        "ppl": math.exp(sum(sums) / (per_segment * len(sums))),
        "nll": round(sum(sums), _NLL_DIGITS),
        "tokens": per_segment * len(sums),
        "segment_tokens": per_segment,
        "nll_segments": [round(x, _NLL_DIGITS) for x in sums],
    }


def _lm_probes(model, run_setup, attention_tokens: int) -> dict[str, Any]:
    L = run_setup.config.task.train_length
    segments = lm_segments(run_setup)
    consistent = bool(run_setup.length_dependent)

    def attention(n: int) -> dict:
        stats = AttentionStats(model, L)
        score_segments(model, segments, n, stats=stats, limit=max(1, attention_tokens // n))
        return stats.summary(n, n)

    out: dict[str, Any] = {
        "reference": {"length": L, **score_segments(model, segments, L, prefix_consistent=consistent)},
        "lengths": [],
        "attention": [attention(L)],
    }
    for e in probe_lengths(run_setup):
        conditions = interventions(run_setup, e)
        entry = {"length": e, "tokens": e, "tau": round(temperature(run_setup, e), 9)}
        entry["offset"] = conditions["shifted"].offset
        for name, iv in conditions.items():
            n = L if name == "shifted" else e
            entry[name] = score_segments(model, segments, n, iv, prefix_consistent=consistent)
        out["lengths"].append(entry)
        out["attention"].append(attention(e))
    out["attention_tokens"] = attention_tokens
    return out


# -- the entry point ----------------------------------------------------------------------------


def probe_metrics(
    model: nn.Module,
    run_setup: Any,
    *,
    samples: int = 128,
    attention_samples: int = 32,
    attention_tokens: int = 2048,
) -> dict[str, Any]:
    """The mechanism probes of a trained run (module docstring): a small JSON-ready dict,
    the record's ``probes`` key.

    Args:
        model: the run's ``posenc.Transformer`` (put in eval mode, restored after).
        run_setup: the run's ``posenc.experiments.train.Setup``.
        samples: synthetic examples per cell (the first ``samples`` test examples).
        attention_samples: synthetic examples whose attention rows are measured.
        attention_tokens: corpora: scored tokens whose attention rows are measured per
            length (at least one chunk).

    Returns:
        ``{"version", "kind", "train_length", "window", "conditions", "reference",
        "lengths": [{"length", "tokens", "tau", "offset", <condition>: metrics}],
        "attention": [{"length", "tokens", "queries", "uniform_entropy", "entropy",
        "near_mass"}], ...}``; metrics as the main evaluation's (with hit counts, or
        per-segment summed NLL).
    """
    positive_int("samples", samples)
    positive_int("attention_samples", attention_samples)
    positive_int("attention_tokens", attention_tokens)
    L = run_setup.config.task.train_length
    was_training = model.training
    model.eval()
    try:
        if run_setup.corpus is not None:
            body = _lm_probes(model, run_setup, attention_tokens)
        else:
            body = _synthetic_probes(model, run_setup, samples, attention_samples)
    finally:
        model.train(was_training)
    head = {
        "version": PROBES_VERSION,
        "kind": "lm" if run_setup.corpus is not None else "synthetic",
        "train_length": L,
        "window": input_tokens(run_setup, L),
        "conditions": list(CONDITIONS),
    }
    return {**head, **body}
