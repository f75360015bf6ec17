"""The evaluation protocol: lengths, the held-out corpus layout, record keys with counts
that intervals are recomputed from, randomized test positions (Ruoss et al. 2023),
prefix-consistent scoring of length-dependent encodings, and the bootstrap intervals."""

from __future__ import annotations

import hashlib
import json
import math
import platform

import numpy as np
import pytest
import torch
from torch import nn

import posenc
from posenc.data.synthetic import SyntheticTask
from posenc.data.text import CharCorpus, segment_starts
from posenc.experiments.config import TaskConfig, config_from_dict, derive_seed
from posenc.experiments.evaluate import (
    TEST_STREAM,
    cached_logits,
    lm_metrics,
    lm_validation,
    random_positions,
    synthetic_metrics,
)
from posenc.experiments.results import validate_record
from posenc.experiments.stats import RESAMPLES, pooled_ci, pooled_ppl_ci, ppl_ci, proportion_ci, wilson_ci
from posenc.experiments.train import checkpoint_path, evaluate_checkpoint, setup, train_run

TINY = {
    "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 16, "eval_factors": [2]},
    "model": {"encoding": "sinusoidal", "dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 6, "batch_size": 8, "lr": 0.003, "warmup": 2, "checkpoint_every": 100, "threads": 1},
}


def _cfg(**sections):
    d = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        d[k].update(v)
    return config_from_dict(d)


# -- lengths and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L, inside",
    [(8, [10, 12, 14]), (16, [20, 24, 28]), (64, [80, 96, 112]), (5, [7, 8, 9]), (3, [4, 5])],
)
def test_synthetic_lengths(L, inside):
    t = TaskConfig(name="copy", train_length=L)
    # 1..L, L + ceil(kL/4) for k = 1, 2, 3 (only those below 2L), then 2L, 4L, 8L.
    assert t.synthetic_lengths == [*range(1, L + 1), *inside, 2 * L, 4 * L, 8 * L]
    assert all(L < n < 2 * L for n in inside)
    assert t.eval_samples == 256


def test_lm_held_out_defaults_and_errors():
    t = TaskConfig(name="shakespeare", train_length=64)
    held = t.held_out()
    assert t.lm_lengths == [64, 128, 256, 512, 1024] and t.stride is None and t.strides == [16, 32, 64, 128, 256]
    assert (held.segments, held.test_context, held.test_scored) == (16, 1024, 4096)
    assert held.segments * held.test_scored == 65536  # >= 65536 scored test tokens
    assert (held.val_context, held.val_scored) == (64, 1024)  # a quarter of the test tokens, at L
    # The default is the smallest multiple of segments x lcm(lengths, stride) >= 65536.
    odd = TaskConfig(name="stdlib", train_length=24, eval_factors=(1, 3, 5))
    unit = math.lcm(24, 72, 120, *odd.strides)  # strides E / 4: 6, 18, 30
    assert odd.held_out().test_scored % unit == 0 and odd.held_out().segments * odd.held_out().test_scored >= 65536
    assert (odd.held_out().test_scored - unit) * 16 < 65536
    with pytest.raises(ValueError, match="eval_tokens=1000 .* use a multiple of 16384"):
        TaskConfig(name="shakespeare", train_length=64, eval_tokens=1000)
    with pytest.raises(ValueError, match="val_tokens=100 .* use a multiple of 1024"):
        TaskConfig(name="shakespeare", train_length=64, val_tokens=100)
    with pytest.raises(ValueError, match="sliding_stride=128 must be <="):
        TaskConfig(name="shakespeare", train_length=64, sliding_stride=128)
    with pytest.raises(ValueError, match="eval_segments must be > 0"):
        TaskConfig(name="shakespeare", eval_segments=0)


# -- the corpus layout ------------------------------------------------------------------------


def _text(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join("abcdefgh"[i] for i in torch.randint(0, 8, (n,), generator=g).tolist())


def test_segments_are_disjoint_spread_and_training_is_the_rest():
    n, k = 10_007, 7
    corpus = CharCorpus.from_text(_text(n), segments=k, test_context=32, test_scored=96, val_context=8, val_scored=40)
    owner = torch.zeros(n, dtype=torch.long)  # 1 test, 2 validation, 3 training
    for value, seg in ((1, corpus.test), (2, corpus.validation)):
        assert seg.count == k and seg.tokens.shape == (k, seg.context + seg.scored)
        for row, start in enumerate(seg.starts.tolist()):
            span = slice(start, start + seg.tokens.shape[1])
            assert (owner[span] == 0).all()  # no overlap with anything held out before
            owner[span] = value
            assert torch.equal(seg.tokens[row], corpus.tokens[span])
    for start, end in corpus.train_spans.tolist():
        assert (owner[start:end] == 0).all()
        owner[start:end] = 3
    assert (owner > 0).all()  # test + validation + training = the whole corpus
    assert int((owner == 1).sum()) == k * 128 and int((owner == 2).sum()) == k * 48
    assert corpus.train_tokens == n - k * 176
    # Spread: segment j lies inside block j of the corpus cut into k equal blocks.
    for j, start in enumerate(corpus.test.starts.tolist()):
        assert j * n // k <= start and start + 176 <= (j + 1) * n // k
    gaps = corpus.test.starts.diff()
    assert int(gaps.max() - gaps.min()) <= 1
    # Training windows never touch held-out text.
    windows = corpus.sample(50, 4000, torch.Generator().manual_seed(1))  # [4000, 51]
    g = torch.Generator().manual_seed(1)
    idx = _sampled_starts(corpus, 50, 4000, g)
    covered = idx[:, None] + torch.arange(51)  # [4000, 51]
    assert (owner[covered] == 3).all()
    assert torch.equal(corpus.tokens[covered], windows)
    assert len(set(idx.tolist())) > 3000  # spread over many windows, not a few


def _sampled_starts(corpus, length, batch, generator):
    """The window starts ``CharCorpus.sample`` draws, recomputed from its definition."""
    counts = (corpus.train_spans[:, 1] - corpus.train_spans[:, 0] - length).clamp(min=0)
    r = torch.randint(0, int(counts.sum()), (batch,), generator=generator)
    out = []
    for v in r.tolist():
        for (s, _), c in zip(corpus.train_spans.tolist(), counts.tolist(), strict=True):
            if v < c:
                out.append(s + v)
                break
            v -= c
    return torch.tensor(out)


def test_layout_errors():
    with pytest.raises(ValueError, match="more than half"):
        CharCorpus.from_text(_text(1000), segments=4, test_context=32, test_scored=64, val_context=8, val_scored=32)
    with pytest.raises(ValueError, match="does not fit in a block"):
        segment_starts(100, 10, 11)
    assert segment_starts(100, 10, 4).tolist() == [3 + 10 * j for j in range(10)]


def test_lm_record_corpus_and_segments(tmp_path):
    path = tmp_path / "corpus.txt"
    text = _text(6000, seed=3)
    path.write_text(text, encoding="utf-8")
    task = {"name": "text", "text_path": str(path), "train_length": 8, "eval_factors": [1, 2, 4]}
    cfg = _cfg(task={**task, "eval_segments": 4, "eval_tokens": 256, "val_tokens": 64})
    rec, _ = train_run(cfg, tmp_path / "run")
    validate_record(rec)
    assert rec["corpus"] == {
        "name": "text:corpus.txt",
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "chars": 6000,
        "python_version": platform.python_version(),
        "test_tokens": 256,
        "validation_tokens": 64,
    }
    assert rec["validation"]["metric"] == "ppl" and rec["validation"]["size"] == 64
    assert rec["validation"]["higher_is_better"] is False and "metrics_random" not in rec
    for m in rec["metrics"]:
        assert m["tokens"] == 256 and m["segment_tokens"] == 64 and len(m["nll_segments"]) == 4
        assert m["ppl"] == pytest.approx(math.exp(sum(m["nll_segments"]) / 256), rel=1e-12)
        assert m["ppl_sliding"] == pytest.approx(math.exp(sum(m["nll_sliding_segments"]) / 256), rel=1e-12)
        lo, hi = ppl_ci(m["nll_segments"], m["segment_tokens"])  # recomputed from the record
        assert lo <= m["ppl"] <= hi
    # The layout the record was scored on is the config's: recomputed independently here.
    s = setup(cfg)
    n = len(text)
    unit = (32 + 64) + (8 + 16)
    assert s.corpus.test.starts.tolist() == [j * n // 4 + (n // 4 - unit) // 2 for j in range(4)]
    # Re-evaluation scores the run's own test segments; longer lengths would need text it trained on.
    ckpt = checkpoint_path(tmp_path / "run", cfg.run_id)
    again = evaluate_checkpoint(ckpt, (1, 2))["metrics"]
    assert again == [m for m in rec["metrics"] if m["length"] in (8, 16)]
    with pytest.raises(ValueError, match="held out 32 tokens of context .* length 64"):
        evaluate_checkpoint(ckpt, (1, 8))


# -- synthetic records, validation and randomized test positions ----------------------------


def test_synthetic_record_counts_validation_and_random_positions(tmp_path):
    plain, _ = train_run(_cfg(), tmp_path / "a")
    rand, _ = train_run(_cfg(train={"randomized_positions": True, "max_position": 40}), tmp_path / "b")
    for rec in (plain, rand):
        validate_record(rec)
        assert [m["length"] for m in rec["metrics"]] == [1, 2, 3, 4, 5, 6]
        assert rec["validation"] == {
            "metric": "exact_match",
            "value": rec["validation"]["value"],
            "higher_is_better": True,
            "size": 3 * 16,  # 16 fresh examples at each length 1..3
        }
        for m in rec["metrics"]:
            assert m["samples"] == 16 and m["tokens"] == 16 * m["length"]  # copy: n answer tokens
            assert m["exact_match"] == m["exact_hits"] / 16 and m["token_accuracy"] == m["token_hits"] / m["tokens"]
            lo, hi = proportion_ci(m["exact_hits"], m["samples"])  # recomputed from the record
            assert lo <= m["exact_match"] <= hi
    assert "metrics_random" not in plain
    assert [m["length"] for m in rand["metrics_random"]] == [1, 2, 3, 4, 5, 6]
    assert [m["samples"] for m in rand["metrics_random"]] == [16] * 6


class PositionSpy(nn.Module):
    """Uniform logits; records every (tokens, positions) it is called with."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.calls = vocab, []

    def forward(self, tokens, positions=None):
        self.calls.append((tokens.clone(), None if positions is None else positions.clone()))
        return torch.zeros(*tokens.shape, self.vocab)


def test_randomized_test_positions_follow_ruoss():
    task = SyntheticTask("copy", num_symbols=4)
    plain, rand = PositionSpy(task.vocab_size), PositionSpy(task.vocab_size)
    synthetic_metrics(plain, task, [3, 5], samples=70, seed=4, batch_size=32)
    synthetic_metrics(rand, task, [3, 5], samples=70, seed=4, batch_size=32, max_position=50)
    assert len(plain.calls) == len(rand.calls) == 6
    for (tok_a, pos_a), (tok_b, pos_b) in zip(plain.calls, rand.calls, strict=True):
        assert torch.equal(tok_a, tok_b)  # the same examples as the metrics at 0..s-1
        assert pos_a is None
        assert pos_b.shape == tok_b.shape
        assert (pos_b.diff(dim=1) > 0).all() and pos_b.min() >= 0 and pos_b.max() < 50  # sorted, distinct
    drawn = torch.cat([p for _, p in rand.calls if p.shape[1] == 2 * 5 + 1])
    assert drawn.max() > 40 and not torch.equal(drawn[0], drawn[1])  # the whole range, one draw per sequence
    again = PositionSpy(task.vocab_size)
    synthetic_metrics(again, task, [3, 5], samples=70, seed=4, batch_size=32, max_position=50)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rand.calls, again.calls, strict=True))  # seeded


def test_randomized_lm_positions_per_window():
    corpus = CharCorpus.from_text(
        _text(4000), segments=2, test_context=16, test_scored=32, val_context=8, val_scored=16
    )
    spy = PositionSpy(corpus.vocab_size)
    plain = lm_metrics(PositionSpy(corpus.vocab_size), corpus, [8, 16], stride=4)
    rand = lm_metrics(spy, corpus, [8, 16], stride=4, max_position=64)
    assert [m["ppl"] for m in rand] == pytest.approx([m["ppl"] for m in plain])  # uniform: positions do not matter
    assert spy.calls
    for _, pos in spy.calls:
        assert (pos.diff(dim=1) > 0).all() and pos.min() >= 0 and pos.max() < 64
    val = lm_validation(PositionSpy(corpus.vocab_size), corpus, 8)
    assert val == {"metric": "ppl", "value": pytest.approx(8.0), "higher_is_better": False, "size": 32}


def test_random_positions_helper():
    pos = random_positions(500, 6, 9, torch.Generator().manual_seed(0))
    assert (pos.diff(dim=1) > 0).all() and pos.min() == 0 and pos.max() == 8
    assert len({tuple(r) for r in pos.tolist()}) > 60  # C(9, 6) = 84 possible draws


# -- prefix-consistent scoring of length-dependent encodings --------------------------------

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "max_len": 6}  # frequencies change past 6 tokens


def _dynamic_model(vocab: int) -> posenc.Transformer:
    torch.manual_seed(0)
    cfg = posenc.TransformerConfig(vocab_size=vocab, dim=32, num_heads=4, num_layers=2, encoding_params=DYNAMIC)
    model = posenc.Transformer(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:  # large q/k weights: attention depends strongly on position
            block.attn.q_proj.weight.mul_(25)
            block.attn.k_proj.weight.mul_(25)
    return model


def test_setup_reads_length_dependence_from_the_built_encoding():
    assert not setup(_cfg(model={"encoding": "rope"})).length_dependent
    assert setup(_cfg(model={"encoding": "rope", "encoding_params": DYNAMIC})).length_dependent


@torch.no_grad()
def test_prefix_consistent_synthetic_equals_greedy_decoding():
    task = SyntheticTask("copy", num_symbols=8)
    model = _dynamic_model(task.vocab_size)
    assert model.pe.length_dependent
    n, samples = 5, 24  # sequences of 12 tokens: past the threshold of 6
    [scored] = synthetic_metrics(model, task, [n], samples=samples, seed=2, batch_size=samples)
    # Brute force from the definition: each answer token's argmax from a full forward of
    # its own true prefix, and greedy decoding feeding its own outputs (no cache).
    ex = task.sample(n, samples, torch.Generator().manual_seed(derive_seed(2, n, TEST_STREAM)))
    prompt = n + 2
    tokens = ex.tokens
    token_hits = 0
    for t in range(prompt, tokens.shape[1]):
        pred = model(tokens[:, :t])[:, -1].argmax(-1)  # [b] from the prefix of t tokens
        token_hits += int((pred == tokens[:, t]).sum())
    generated = tokens[:, :prompt]
    for _ in range(n):
        generated = torch.cat([generated, model(generated)[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy_hits = int((generated[:, prompt:] == tokens[:, prompt:]).all(dim=1).sum())
    assert scored["exact_hits"] == greedy_hits and scored["token_hits"] == token_hits
    assert 0 < token_hits < samples * n  # neither trivially all right nor all wrong
    # The logits the scores come from are each prefix's own; a full forward's are not (it
    # gives earlier tokens the final length's frequencies), so the comparison can fail.
    own = torch.stack([model(tokens[:, :t])[:, -1] for t in range(prompt, tokens.shape[1])], dim=1)  # [b, n, V]
    cached = cached_logits(model, tokens[:, :-1], None, prompt)  # [b, n, vocab]
    assert torch.allclose(cached, own, atol=1e-5)
    full = model(tokens[:, :-1])[:, prompt - 1 :]  # [b, n, vocab]
    assert (full - own).abs().max() > 1e-3


@torch.no_grad()
def test_prefix_consistent_lm_equals_per_token_prefix_forwards():
    corpus = CharCorpus.from_text(_text(3000), segments=2, test_context=12, test_scored=24, val_context=4, val_scored=8)
    model = _dynamic_model(corpus.vocab_size)
    metrics = lm_metrics(model, corpus, [4, 12], stride=4)
    for m in metrics:
        E = m["length"]
        for key, stride in (("nll_segments", E), ("nll_sliding_segments", 4)):
            expected = []
            for row in corpus.test.tokens:  # [36]
                total = 0.0
                for end in range(12 + stride, 36 + 1, stride):  # windows of E ending at `end`
                    window = row[end - E - 1 : end]  # [E + 1]
                    for i in range(E - stride, E):  # each scored token from its own prefix
                        logits = model(window[None, : i + 1])[0, -1]
                        total += float(nn.functional.cross_entropy(logits[None], window[None, i + 1]))
                expected.append(total)
            assert m[key] == pytest.approx(expected, rel=1e-5)
    # Past the threshold the window's full forward differs (so the test above can fail).
    plain = lm_metrics(model, corpus, [12], stride=4, prefix_consistent=False)
    assert abs(plain[0]["ppl"] - metrics[1]["ppl"]) > 1e-4


# -- the bootstrap intervals ------------------------------------------------------------------


@pytest.mark.parametrize("hits", [26, 128, 205, 250])
def test_proportion_ci_close_to_wilson(hits):
    lo, hi = proportion_ci(hits, 256)
    w_lo, w_hi = wilson_ci(hits, 256)
    assert lo <= hits / 256 <= hi
    assert abs(lo - w_lo) < 0.012 and abs(hi - w_hi) < 0.012


def test_wilson_closed_form_and_degenerate_bootstrap():
    z2 = 1.959963984540054**2
    assert wilson_ci(0, 256)[1] == pytest.approx(z2 / (256 + z2))  # Wilson's upper end at 0 / n
    assert proportion_ci(0, 256) == (0.0, 0.0) and proportion_ci(256, 256) == (1.0, 1.0)  # documented


def test_proportion_ci_properties():
    wide, narrow = proportion_ci(32, 64), proportion_ci(512, 1024)
    assert wide[1] - wide[0] > 3 * (narrow[1] - narrow[0])  # width ~ 1/sqrt(n): 4x for 16x n
    assert proportion_ci(100, 256, seed=5) == proportion_ci(100, 256, seed=5)
    assert proportion_ci(100, 256, level=0.5)[1] - proportion_ci(100, 256, level=0.5)[0] < (
        proportion_ci(100, 256)[1] - proportion_ci(100, 256)[0]
    )
    # Coverage: the 95% interval holds the true rate in about 95% of simulated data sets.
    rng = np.random.default_rng(0)
    hits = rng.binomial(256, 0.3, size=300)
    covered = sum(lo <= 0.3 <= hi for lo, hi in (proportion_ci(int(h), 256, resamples=2000) for h in hits))
    assert 0.90 <= covered / 300 <= 0.99
    for bad, match in [((5, 0), "n must be"), ((7, 5), "hits must be"), ((1.5, 5), "hits must be")]:
        with pytest.raises(ValueError, match=match):
            proportion_ci(*bad)
    with pytest.raises(ValueError, match="level"):
        proportion_ci(1, 5, level=95)
    with pytest.raises(ValueError, match="resamples"):
        proportion_ci(1, 5, resamples=10)


def test_ppl_ci_properties():
    equal = ppl_ci([50.0] * 8, 40)
    assert equal == pytest.approx((math.exp(50 / 40), math.exp(50 / 40)))  # every resample the same
    g = np.random.default_rng(1)
    nll = (g.normal(2.0, 0.3, size=16) * 4096).tolist()
    lo, hi = ppl_ci(nll, 4096)
    assert lo < math.exp(sum(nll) / (16 * 4096)) < hi
    # Against the normal approximation of the mean NLL per token over segments.
    per_token = np.array(nll) / 4096
    se = per_token.std(ddof=1) / math.sqrt(16)
    mean = per_token.mean()
    assert math.log(lo) == pytest.approx(mean - 1.96 * se, abs=0.25 * se)
    assert math.log(hi) == pytest.approx(mean + 1.96 * se, abs=0.25 * se)
    sub_lo, sub_hi = ppl_ci(nll[:4], 4096)
    assert sub_hi - sub_lo > hi - lo
    with pytest.raises(ValueError, match="segment_tokens"):
        ppl_ci(nll, 0)
    with pytest.raises(ValueError, match="nll_segments"):
        ppl_ci([], 10)


def test_pooled_intervals():
    one = pooled_ci([(128, 256)])
    assert one[0] == pytest.approx(proportion_ci(128, 256)[0], abs=0.01)
    assert one[1] == pytest.approx(proportion_ci(128, 256)[1], abs=0.01)
    lo, hi = pooled_ci([(200, 256), (230, 256), (150, 256)])
    assert lo <= (200 + 230 + 150) / 768 <= hi
    assert hi - lo > proportion_ci(580, 768)[1] - proportion_ci(580, 768)[0]  # seed-to-seed spread adds width
    assert pooled_ci([(200, 256), (230, 256)], seed=3) == pooled_ci([(200, 256), (230, 256)], seed=3)
    segs = [40.0, 44.0, 38.0, 41.0]
    p_lo, p_hi = pooled_ppl_ci([(segs, 20)], resamples=RESAMPLES)
    s_lo, s_hi = ppl_ci(segs, 20)
    assert p_lo == pytest.approx(s_lo, rel=0.01) and p_hi == pytest.approx(s_hi, rel=0.01)
    both = pooled_ppl_ci([(segs, 20), ([60.0, 58.0, 61.0, 59.0], 20)])
    assert both[0] < math.exp((sum(segs) + 238.0) / 160) < both[1]
    with pytest.raises(ValueError, match=r"runs\[1\]"):
        pooled_ci([(1, 2), (3, 2)])


# -- the record schema ------------------------------------------------------------------------


def _record(metrics, **extra):
    base = {
        "run_id": "r",
        "task": "copy",
        "encoding": "rope",
        "seed": 0,
        "train_length": 2,
        "config": {},
        "git_commit": "x",
        "torch_version": "x",
        "wall_time_s": 1.0,
        "metrics": metrics,
    }
    return {**base, **extra}


def test_schema_checks_counts_against_rates_and_accepts_older_records():
    syn = {"length": 2, "exact_match": 0.5, "token_accuracy": 0.75}
    validate_record(_record([syn]))  # an older record: rates only
    counts = {"samples": 4, "exact_hits": 2, "tokens": 8, "token_hits": 6}
    val = {"metric": "exact_match", "value": 0.5, "higher_is_better": True, "size": 8}
    validate_record(_record([{**syn, **counts}], validation=val, metrics_random=[{**syn, **counts}]))
    nll = [10.0, 12.0]
    lm = {
        "length": 4,
        "ppl": math.exp(22 / 16),
        "ppl_sliding": math.exp(22 / 16),
        "tokens": 16,
        "segment_tokens": 8,
        "sliding_stride": 1,
    }
    corpus = {
        "name": "text:t",
        "sha256": "ab",
        "chars": 100,
        "python_version": "3.11.7",
        "test_tokens": 16,
        "validation_tokens": 8,
    }
    validate_record(_record([{**lm, "nll_segments": nll, "nll_sliding_segments": nll}], corpus=corpus))
    bad = [
        (_record([{**syn, **counts, "exact_hits": 3}]), r"exact_match=0.5 is not exact_hits / samples"),
        (_record([{**syn, **counts, "token_hits": 9}]), r"token_hits=9 must be an int in \[0, tokens=8\]"),
        (_record([{**lm, "nll_segments": nll[:1], "nll_sliding_segments": nll}]), "nll_segments must be 2 numbers"),
        (_record([{**lm, "nll_segments": [11.0, 12.0], "nll_sliding_segments": nll}]), "ppl=.* is not exp"),
        (_record([syn], validation={**val, "higher_is_better": False}), "validation metric must be"),
        (_record([syn], validation={**val, "size": 0}), "size a positive int"),
        (_record([syn], corpus={**corpus, "chars": 0}), "corpus chars must be a positive int"),
        (_record([syn], metrics_random=[]), "metrics_random must be a non-empty list"),
    ]
    for record, match in bad:
        with pytest.raises(ValueError, match=match):
            validate_record(record)
