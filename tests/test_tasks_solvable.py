"""Every synthetic task can be solved at every test length: with the study's settings,
every answer token (and for ``count`` every whole answer) at the test lengths occurs
among the answers of training examples; and each task's answers equal a plain-Python
re-statement of the task (``dict`` lookup for recall, ``list.count`` for count)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posenc.data.synthetic import BOS, NUM_SPECIAL, PAD, SEP, SYNTHETIC_TASKS, SyntheticTask
from posenc.experiments.study import plan_study

L = 8
# Every training length, every length up to 2L, and 4L, 8L (a superset of the study's).
TEST_LENGTHS = list(range(1, 2 * L + 1)) + [4 * L, 8 * L]
# The study's symbols per task (src/posenc/experiments/study.py): count needs few symbols
# for its counts to spread over 1..L, recall needs 2 * 8L symbols for 8L distinct keys.
STUDY_SYMBOLS = {"copy": 32, "reverse": 32, "duplicate": 32, "sort": 32, "count": 4, "recall": 128}
TRAIN_PER_LENGTH = 500  # 4000 training examples over n = 1..8
TEST_PER_LENGTH = 256  # the presets' samples per test length


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _answers(ex) -> list[tuple[int, ...]]:
    """The masked tokens of every row, as tuples."""
    return [tuple(t[m].tolist()) for t, m in zip(ex.tokens, ex.answer_mask, strict=True)]


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_study_task_settings(preset):
    """The settings this file checks are the ones the study trains with."""
    assert set(STUDY_SYMBOLS) == set(SYNTHETIC_TASKS)
    configs, _ = plan_study(preset, encodings=["none"], tasks=list(SYNTHETIC_TASKS), seeds=[0])
    got = {c.task.name: (c.task.train_length, c.task.num_symbols) for c in configs}
    assert got == {name: (L, s) for name, s in STUDY_SYMBOLS.items()}


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_every_test_answer_occurs_in_training(name):
    task = SyntheticTask(name, num_symbols=STUDY_SYMBOLS[name])
    train_tokens: set[int] = set()
    train_answers: set[tuple[int, ...]] = set()
    for n in range(1, L + 1):
        answers = _answers(task.sample(n, TRAIN_PER_LENGTH, _gen(n)))
        train_answers.update(answers)
        train_tokens.update(t for a in answers for t in a)
    for n in TEST_LENGTHS:
        answers = _answers(task.sample(n, TEST_PER_LENGTH, _gen(1000 + n)))
        unseen = {t for a in answers for t in a} - train_tokens
        assert not unseen, (name, n, sorted(unseen))
        if name == "count":
            assert set(answers) <= train_answers, (n, sorted(set(answers) - train_answers))


def test_count_answers_at_test_lengths_are_the_training_answers():
    """count: the answers at every test length are the single digits 1..8 (max_count 8)."""
    task = SyntheticTask("count", num_symbols=STUDY_SYMBOLS["count"])
    digit0 = NUM_SPECIAL + task.num_symbols
    for n in TEST_LENGTHS:
        answers = set(_answers(task.sample(n, TEST_PER_LENGTH, _gen(n))))
        assert answers == {(digit0 + c,) for c in range(1, min(n, 8) + 1)}, n


def test_recall_needs_two_symbols_per_pair():
    task = SyntheticTask("recall", num_symbols=STUDY_SYMBOLS["recall"])
    assert task.sample(8 * L, 2, _gen(0)).tokens.shape == (2, task.sequence_length(8 * L)) == (2, 4 * 8 * L + 2)
    short = SyntheticTask("recall", num_symbols=32)
    for call in (lambda: short.sample(17, 2, _gen(0)), lambda: short.sequence_length(17)):
        with pytest.raises(ValueError, match=r"n=17 .* num_symbols=32 has 16 .* use num_symbols >= 34"):
            call()
    assert short.sample(16, 2, _gen(0)).tokens.shape == (2, 66)  # 16 keys suffice for n = 16


def test_max_count_is_validated():
    with pytest.raises(ValueError, match="max_count must be >= 1"):
        SyntheticTask("count", max_count=0)
    with pytest.raises(TypeError, match="max_count must be an int"):
        SyntheticTask("count", max_count=2.0)


def _recall_parts(tokens: list[int], n: int):
    """(keys, values, queries, answers) of one recall example, checking its frame."""
    assert len(tokens) == 4 * n + 2 and tokens[0] == BOS and tokens[2 * n + 1] == SEP
    pairs, tail = tokens[1 : 2 * n + 1], tokens[2 * n + 2 :]
    return pairs[0::2], pairs[1::2], tail[0::2], tail[1::2]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), extra=st.integers(0, 9), seed=st.integers(0, 2**31))
def test_recall_matches_dict_lookup(n, extra, seed):
    s = 2 * n + extra
    task = SyntheticTask("recall", num_symbols=s)
    ex = task.sample(n, 8, _gen(seed))
    assert ex.tokens.shape == (8, task.sequence_length(n))
    half = s // 2
    for row in range(8):
        keys, values, queries, answers = _recall_parts(ex.tokens[row].tolist(), n)
        assert len(set(keys)) == n and all(NUM_SPECIAL <= k < NUM_SPECIAL + half for k in keys)
        assert all(NUM_SPECIAL + half <= v < NUM_SPECIAL + s for v in values)
        assert sorted(queries) == sorted(keys)
        table = dict(zip(keys, values, strict=True))
        assert answers == [table[q] for q in queries]
        # The mask is on a1..an only: the 2n + 2 frame tokens and the queries are read.
        assert ex.answer_mask[row].tolist() == [False] * (2 * n + 2) + [False, True] * n


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    s=st.integers(2, 9),
    max_count=st.sampled_from([1, 3, 8, 9, 10, 12, 100]),
    seed=st.integers(0, 2**31),
)
def test_count_matches_list_count(n, s, max_count, seed):
    task = SyntheticTask("count", num_symbols=s, max_count=max_count)
    ex = task.sample(n, 8, _gen(seed))
    width = len(str(max_count))
    assert ex.tokens.shape == (8, task.sequence_length(n)) == (8, n + 3 + width)
    digit0 = NUM_SPECIAL + s
    for row in range(8):
        toks = ex.tokens[row].tolist()
        assert toks[0] == BOS and toks[n + 2] == SEP
        x, q, answer = toks[1 : n + 1], toks[n + 1], toks[n + 3 :]
        assert all(NUM_SPECIAL <= t < NUM_SPECIAL + s for t in [*x, q])
        assert all(digit0 <= d < digit0 + 10 for d in answer) and len(answer) == width
        c = int("".join(str(d - digit0) for d in answer))
        assert c == x.count(q) and 1 <= c <= min(n, max_count)
        assert ex.answer_mask[row].tolist() == [False] * (n + 3) + [True] * width


def test_count_distribution():
    """c is uniform over 1..min(n, 8) and the query uniform over the symbols (8000
    examples: each frequency within 5 binomial standard deviations)."""
    task = SyntheticTask("count", num_symbols=4)
    for n in (3, 8, 64):
        ex = task.sample(n, 8000, _gen(n))
        counts = ex.tokens[:, -1] - NUM_SPECIAL - 4  # [8000]
        queries = ex.tokens[:, n + 1] - NUM_SPECIAL  # [8000]
        for values, k in ((counts - 1, min(n, 8)), (queries, 4)):
            freq = values.bincount(minlength=k).double() / 8000
            sd = (1 / k * (1 - 1 / k) / 8000) ** 0.5
            assert len(freq) == k and (freq - 1 / k).abs().max() < 5 * sd, (n, freq.tolist())


def test_recall_query_order_and_keys_are_uniform():
    """The query order is a uniform permutation (P(q1 = k_j) = 1/n) and keys are uniform
    over the key half (8000 examples, 5 binomial standard deviations)."""
    n, s = 4, 16
    ex = SyntheticTask("recall", num_symbols=s).sample(n, 8000, _gen(0))
    keys = ex.tokens[:, 1 : 2 * n + 1 : 2]  # [8000, n]
    first_query = ex.tokens[:, 2 * n + 2]  # [8000]
    slot = (keys == first_query[:, None]).long().argmax(dim=1)  # [8000]: which pair q1 asks
    freq = slot.bincount(minlength=n).double() / 8000
    sd = (1 / n * (1 - 1 / n) / 8000) ** 0.5
    assert (freq - 1 / n).abs().max() < 5 * sd, freq.tolist()
    key_freq = (keys[:, 0] - NUM_SPECIAL).bincount(minlength=s // 2).double() / 8000
    p = 2 / s
    assert len(key_freq) == s // 2 and (key_freq - p).abs().max() < 5 * (p * (1 - p) / 8000) ** 0.5


def test_recall_layout_by_hand():
    # [BOS] k1 v1 k2 v2 [SEP] q1 a1 q2 a2: 4n + 2 tokens, the mask on a1 and a2.
    ex = SyntheticTask("recall", num_symbols=4).sample(2, 1, _gen(3))
    t = ex.tokens[0].tolist()
    assert len(t) == 10 and t[0] == BOS and t[5] == SEP
    k1, v1, k2, v2 = t[1:5]
    assert {k1, k2} == {NUM_SPECIAL, NUM_SPECIAL + 1} and {v1, v2} <= {NUM_SPECIAL + 2, NUM_SPECIAL + 3}
    assert t[6:] in ([k1, v1, k2, v2], [k2, v2, k1, v1])
    assert ex.answer_mask[0].tolist() == [False] * 7 + [True, False, True]


def test_recall_sample_mixed_keeps_each_example():
    """Right-padding in a mixed batch keeps each example and its query/answer mask."""
    task = SyntheticTask("recall", num_symbols=16)
    lengths = torch.tensor([3, 1, 5, 3])
    ex, pos = task.sample_mixed(lengths, _gen(0))
    assert ex.tokens.shape == (4, 22)
    for row, n in enumerate(lengths.tolist()):
        s = 4 * n + 2
        assert ex.tokens[row, s:].eq(PAD).all() and not ex.answer_mask[row, s:].any()
        assert pos[row, :s].tolist() == list(range(s))
        keys, values, queries, answers = _recall_parts(ex.tokens[row, :s].tolist(), n)
        table = dict(zip(keys, values, strict=True))
        assert answers == [table[q] for q in queries]
        assert ex.answer_mask[row, :s].tolist() == [False] * (2 * n + 2) + [False, True] * n
