"""Scoring a trained model past its training length.

Synthetic tasks: exact match and per-token accuracy on the answer tokens, with teacher
forcing (the argmax at every answer position given the true prefix). Exact match under
teacher forcing equals exact match of greedy decoding: greedy decoding goes wrong
exactly at the first answer token whose teacher-forced argmax is wrong.

Language modelling (Press et al. 2022, appendix B): perplexity on the *same* final
``T`` validation tokens at every evaluation length ``E``:

* non-overlapping: the ``T`` tokens are cut into ``T / E`` chunks of ``E``; every token
  is predicted from the tokens before it in its chunk (context 0..E-1);
* sliding window with stride ``S``: windows of ``E`` tokens advance by ``S`` and score
  only their last ``S`` tokens, so every token sees at least ``E - S`` tokens of
  context (``S = 1`` is the paper's setting; larger ``S`` is cheaper).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from posenc.data.synthetic import SyntheticTask
from posenc.data.text import CharCorpus
from posenc.experiments.config import derive_seed
from posenc.functional.checks import positive_int


@torch.no_grad()
def synthetic_metrics(
    model: nn.Module,
    task: SyntheticTask,
    lengths: list[int],
    *,
    samples: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict[str, float | int]]:
    """``[{"length", "exact_match", "token_accuracy"}]`` at each length ``n``.

    The examples at length ``n`` depend only on ``(seed, n)``, so every encoding and
    every resumed run is scored on the same examples.
    """
    positive_int("samples", samples)
    was_training = model.training
    model.eval()
    out = []
    for n in lengths:
        gen = torch.Generator().manual_seed(derive_seed(seed, n, 7))
        exact = correct = total = 0
        left = samples
        while left:
            b = min(left, batch_size)
            left -= b
            ex = task.sample(n, b, gen)
            logits = model(ex.tokens[:, :-1])  # [b, s-1, vocab]: position t predicts token t+1
            pred = logits.argmax(-1)  # [b, s-1]
            target, mask = ex.tokens[:, 1:], ex.answer_mask[:, 1:]  # [b, s-1]
            hit = (pred == target) | ~mask
            exact += int(hit.all(dim=1).sum())
            correct += int(((pred == target) & mask).sum())
            total += int(mask.sum())
        out.append({"length": n, "exact_match": exact / samples, "token_accuracy": correct / total})
    model.train(was_training)
    return out


@torch.no_grad()
def _nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, score_last: int) -> float:
    """Summed NLL of the last ``score_last`` targets of each row; ``inputs/targets [n, E]``."""
    logits = model(inputs)[:, -score_last:].float()  # [n, score_last, vocab]
    return float(
        nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, -score_last:].reshape(-1), reduction="sum"
        )
    )


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    corpus: CharCorpus,
    lengths: list[int],
    *,
    eval_tokens: int,
    stride: int,
    batch_size: int = 8,
) -> list[dict[str, float | int]]:
    """``[{"length", "ppl", "ppl_sliding"}]``: perplexity of the final ``eval_tokens``
    validation tokens at every length, non-overlapping and with a sliding window."""
    positive_int("eval_tokens", eval_tokens)
    positive_int("stride", stride)
    val = corpus.val
    longest = max(lengths)
    for e in lengths:
        if eval_tokens % e:
            raise ValueError(f"eval_tokens={eval_tokens} must be a multiple of every evaluation length, got {e}")
        if e < stride:
            raise ValueError(f"sliding_stride={stride} must be <= every evaluation length, got {e}")
    if eval_tokens % stride:
        raise ValueError(f"eval_tokens={eval_tokens} must be a multiple of sliding_stride={stride}")
    if len(val) < eval_tokens + longest + 1:
        raise ValueError(
            f"the validation split has {len(val)} tokens; evaluating {eval_tokens} tokens at length {longest} "
            f"needs {eval_tokens + longest + 1} (use more text or a larger val_fraction)"
        )
    was_training = model.training
    model.eval()
    a = len(val) - eval_tokens  # index of the first scored token
    out = []
    for e in lengths:
        # Non-overlapping: chunk j predicts tokens [a + jE, a + (j+1)E) from inputs shifted by one.
        starts = torch.arange(a - 1, a - 1 + eval_tokens, e)  # [T/E]
        nll = 0.0
        for i in range(0, len(starts), batch_size):
            idx = starts[i : i + batch_size, None] + torch.arange(e + 1)  # [n, E+1]
            chunk = val[idx]
            nll += _nll(model, chunk[:, :-1], chunk[:, 1:], e)
        ppl = math.exp(nll / eval_tokens)
        # Sliding: window j has inputs [u, u+E), u = a + (j+1)S - E - 1; scores its last S predictions.
        ends = torch.arange(a + stride, a + eval_tokens + 1, stride)  # [T/S] one past the last scored token
        nll = 0.0
        for i in range(0, len(ends), batch_size):
            idx = ends[i : i + batch_size, None] - e - 1 + torch.arange(e + 1)  # [n, E+1]
            chunk = val[idx]
            nll += _nll(model, chunk[:, :-1], chunk[:, 1:], stride)
        out.append({"length": e, "ppl": ppl, "ppl_sliding": math.exp(nll / eval_tokens)})
    model.train(was_training)
    return out
