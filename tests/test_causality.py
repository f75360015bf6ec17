"""Causality as a contract, over the whole registry and every RoPE scaling rule.

For each encoding in a causal ``Transformer`` (random weights, eval mode, float32):

(a) appending tokens changes no logit of an earlier position: the logits of every
    prefix of a sequence equal the first logits of the whole sequence (atol ``ATOL``);
(b) scoring with teacher forcing is what a user decoding greedily gets. Teacher forcing
    is ``posenc.experiments.evaluate.synthetic_metrics``'s rule: the argmax at each answer
    position given the true prefix. Greedy decoding feeds the prompt to a KV cache
    (``model.new_cache()``), then one token at a time: the model's own argmax at answer
    positions, the given token elsewhere (``recall``'s queries). Two properties:

    * the model's own greedy output, scored by one teacher-forced forward, gives the
      logits of every decoding step and the same argmax at every answer position;
    * on a task example, the greedy prediction equals the teacher-forced one at every
      answer position up to the first wrong one (before it both saw the true prefix),
      and the exact match of every example is the same under both.

The checks can fail: ``normalized`` with ``length=None`` (each row divided by its own
last index) and the length-dependent RoPE rules (``dynamic``, ``longrope``) fail (a).
"""

from __future__ import annotations

import pytest
import torch

import posenc
from posenc.data.synthetic import SyntheticTask
from posenc.functional.rope_scaling import SCALING_RULES

#: Model sizes: width, heads, key/value heads, layers, longest position.
DIM, HEADS, KV_HEADS, LAYERS, MAX_LEN = 32, 4, 2, 2, 64
#: Float32 rounding allowed between two computations of the same logits.
ATOL = 1e-4
SEEDS = (0, 1, 2)
#: Trained context of the RoPE rules: sequences here are longer, so a rule that changes
#: with the length changes inside them.
CONTEXT = 6
HEAD_DIM = DIM // HEADS
#: Synthetic examples of (b): the task and the length n (copy: 12 tokens, recall: 14).
TASKS = ((SyntheticTask("copy", num_symbols=8), 5), (SyntheticTask("recall", num_symbols=8), 3))
VOCAB = max(task.vocab_size for task, _ in TASKS)

#: rope_parameters of the scaling rules that have no ``stretch`` (``posenc extend``).
RULES_WITHOUT_STRETCH = {
    "longrope": {
        "original_max_position_embeddings": CONTEXT,
        "factor": 4.0,
        "short_factor": [1.0, 1.5, 2.0, 3.0],  # one per rotated pair: head_dim / 2
        "long_factor": [2.0, 4.0, 8.0, 16.0],
    },
    "proportional": {"partial_rotary_factor": 0.5},
}


def rule_params(name: str) -> dict:
    """``rope`` parameters of scaling rule ``name`` stretching ``CONTEXT`` by 2."""
    rule = SCALING_RULES[name]
    if rule.stretch is not None:
        keys = rule.stretch(2.0, CONTEXT, HEAD_DIM, 10000.0)
    else:
        keys = RULES_WITHOUT_STRETCH[name]
    return {"max_len": CONTEXT, "rope_parameters": {"rope_type": rule.rope_type or name, **keys}}


def rule_names(length_dependent: bool) -> list[str]:
    return sorted(n for n, rule in SCALING_RULES.items() if rule.length_dependent == length_dependent)


#: (id, encoding name, encoding_params): every registered encoding with its example
#: parameters, normalized with a length shorter than the sequences (positions past it),
#: and rope with every scaling rule that does not depend on the length.
CASES = [(name, name, dict(posenc.get(name).example_params)) for name in posenc.available()]
CASES += [("normalized-length-4", "normalized", {"length": 4})]
CASES += [(f"rope-{rule}", "rope", rule_params(rule)) for rule in rule_names(length_dependent=False)]


def causal_model(name: str, params: dict, seed: int, pe: posenc.PositionalEncoding | None = None):
    """A causal ``Transformer`` built from the config (or around ``pe``), with random
    encoding parameters (zero-initialized tables would hide a position signal) and
    sharpened q/k projections, so attention, and so the logits, depend on positions."""
    torch.manual_seed(seed)
    config = posenc.TransformerConfig(
        vocab_size=VOCAB,
        dim=DIM,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        encoding=name,
        encoding_params=params,
        max_len=MAX_LEN,
    )
    model = posenc.Transformer(config, pe=pe).eval()
    with torch.no_grad():
        for param in model.pe.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(10)
            block.attn.k_proj.weight.mul_(10)
    return model


@torch.no_grad()
def prefix_drift(model, tokens: torch.Tensor) -> float:
    """Largest change of an earlier position's logits when the rest of ``tokens [b, s]``
    is appended, over every prefix length ``1..s-1``."""
    full = model(tokens)  # [b, s, vocab]
    return max(float((model(tokens[:, :n]) - full[:, :n]).abs().max()) for n in range(1, tokens.shape[1]))


@torch.no_grad()
def greedy_decode(model, tokens: torch.Tensor, mask: torch.Tensor, start: int):
    """Decode from the prompt ``tokens[:, :start]`` with the KV cache, one token at a
    time: the argmax at answer positions (``mask [b, s]``), the given token elsewhere.

    Returns the decoded sequence ``[b, s]``, the argmax at each position ``start..s-1``
    ``[b, s - start]`` and the logits of those steps ``[b, s - start, vocab]``.
    """
    cache = model.new_cache()
    logits = model(tokens[:, :start], cache=cache)[:, -1]  # [b, vocab]: predicts token `start`
    seq, preds, steps = tokens[:, :start], [], []
    for t in range(start, tokens.shape[1]):
        pred = logits.argmax(-1)  # [b]
        preds.append(pred)
        steps.append(logits)
        fed = torch.where(mask[:, t], pred, tokens[:, t])  # [b]
        seq = torch.cat([seq, fed[:, None]], dim=1)
        if t + 1 < tokens.shape[1]:
            logits = model(fed[:, None], cache=cache)[:, -1]
    return seq, torch.stack(preds, 1), torch.stack(steps, 1)


def argmax_within_rounding(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Where ``chosen`` is an argmax of ``logits [..., vocab]`` up to ``ATOL`` (a tie that
    float32 rounding may break either way), ``[...]`` bool."""
    return logits.gather(-1, chosen[..., None])[..., 0] >= logits.amax(-1) - ATOL


@pytest.mark.parametrize("name,params", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_appending_tokens_changes_no_earlier_logit(name, params):
    for seed in SEEDS:
        model = causal_model(name, params, seed)
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
        drift = prefix_drift(model, tokens)
        assert drift <= ATOL, f"{name} {params} seed {seed}: an earlier logit moved by {drift:.3g}"


@pytest.mark.parametrize("name,params", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("task,n", TASKS, ids=[task.name for task, _ in TASKS])
def test_teacher_forcing_scores_what_greedy_decoding_produces(name, params, task, n):
    for seed in SEEDS:
        model = causal_model(name, params, seed)
        ex = task.sample(n, 8, torch.Generator().manual_seed(seed))
        tokens, mask = ex.tokens, ex.answer_mask  # [b, s]
        start = int(mask[0].nonzero()[0])  # the first answer position: the prompt is tokens[:, :start]
        assert (mask.long().argmax(1) == start).all()  # one prompt length for the whole batch
        seq, greedy, steps = greedy_decode(model, tokens, mask, start)
        answer = mask[:, start:]  # [b, s - start]
        with torch.no_grad():
            own = model(seq[:, :-1])[:, start - 1 :]  # [b, s - start, vocab]: teacher forcing on the greedy output
            true = model(tokens[:, :-1])[:, start - 1 :]  # synthetic_metrics: given the true prefix
        where = f"{name} {params} {task.name} seed {seed}"
        # The model's own output, scored by teacher forcing: the logits of every step.
        drift = float((steps - own).abs().max())
        assert drift <= ATOL, f"{where}: a decoding step's logits differ from teacher forcing by {drift:.3g}"
        assert argmax_within_rounding(own, seq[:, start:])[answer].all(), where
        # A task example: equal up to the first wrong answer token, the same exact match.
        target = tokens[:, start:]
        forced = true.argmax(-1)  # [b, s - start]
        wrong = (forced != target) & answer
        true_prefix = (wrong.cumsum(1) - wrong.long()) == 0  # no wrong answer token before t
        agree = argmax_within_rounding(true, greedy)  # greedy's choice is a teacher-forced argmax
        assert agree[answer & true_prefix].all(), f"{where}: greedy and teacher forcing differ on the true prefix"
        exact_forced = ((forced == target) | ~answer).all(1)
        exact_greedy = ((seq[:, start:] == target) | ~answer).all(1)
        assert torch.equal(exact_forced, exact_greedy), where


def test_every_scaling_rule_is_covered():
    """A new scaling rule without ``stretch`` needs its parameters here."""
    missing = [n for n, rule in SCALING_RULES.items() if rule.stretch is None and n not in RULES_WITHOUT_STRETCH]
    assert not missing, f"add rope_parameters for {missing} to RULES_WITHOUT_STRETCH"
    assert rule_names(length_dependent=True), "no length-dependent rule left to show that (a) can fail"


@pytest.mark.parametrize("rule", rule_names(length_dependent=True))
def test_length_dependent_rope_rules_fail_appending(rule):
    """A rule whose frequencies change with the length changes earlier logits when the
    sequence grows past its threshold: (a) fails, at every seed."""
    for seed in SEEDS:
        model = causal_model("rope", rule_params(rule), seed)
        assert model.pe.length_dependent
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
        assert prefix_drift(model, tokens) > ATOL, (rule, seed)


def test_normalized_without_length_fails_appending_and_is_refused_causally():
    """Each row divided by its own last index: every logit depends on the sequence's final
    length. Built around an explicit instance (a causal config refuses it), (a) fails."""
    with pytest.raises(ValueError, match="length=None"):
        causal_model("normalized", {}, 0)
    for seed in SEEDS:
        pe = posenc.create("normalized", dim=DIM)
        model = causal_model("none", {}, seed, pe=pe)
        assert model.pe.length_dependent
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
        assert prefix_drift(model, tokens) > ATOL, seed
