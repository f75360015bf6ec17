"""The study harness end to end on tiny configs: metrics against stub models with known
answers, train / interrupt / resume with identical metrics, skip on re-run, the results
schema, and every bad input as a one-line error with nothing half-written."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from posenc.cli import app
from posenc.data.synthetic import SyntheticTask
from posenc.data.text import CharCorpus
from posenc.experiments.config import config_from_dict, load_config
from posenc.experiments.evaluate import lm_metrics, synthetic_metrics
from posenc.experiments.results import KEYS, PROVENANCE_KEYS, append_result, read_results
from posenc.experiments.study import plan_study
from posenc.experiments.train import checkpoint_path, random_positions, train_run

TINY = {
    "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 8, "eval_factors": [2]},
    "model": {"encoding": "sinusoidal", "dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 30, "batch_size": 8, "lr": 0.003, "warmup": 5, "checkpoint_every": 10, "threads": 1},
}


def _cfg(**sections):
    d = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        d[k].update(v)
    return config_from_dict(d)


# -- metrics against stub models -------------------------------------------------------------


class CopyOracle(nn.Module):
    """Predicts the copy answer exactly; ``wrong_last`` spoils the last answer token."""

    def __init__(self, vocab: int, wrong_last: bool = False) -> None:
        super().__init__()
        self.vocab, self.wrong_last = vocab, wrong_last

    def forward(self, tokens, positions=None):  # tokens [b, s] = BOS x SEP x[:-1]
        b, s = tokens.shape
        n = s // 2  # s = 2n + 1
        pred = torch.zeros(b, s, dtype=torch.long)
        pred[:, n + 1 : 2 * n + 1] = tokens[:, 1 : n + 1]  # position n+j predicts answer token j
        if self.wrong_last:
            pred[:, 2 * n] = (tokens[:, n] + 1 - 3) % 4 + 3  # a symbol other than x_n
        return nn.functional.one_hot(pred, self.vocab).float()


def _row(n, exact, tokens, token_hits, samples=10):
    """A metrics entry: rates from the counts."""
    counts = {"samples": samples, "exact_hits": exact, "tokens": tokens, "token_hits": token_hits}
    return {"length": n, "exact_match": exact / samples, "token_accuracy": token_hits / tokens, **counts}


def test_synthetic_metrics_exact_and_token_accuracy():
    task = SyntheticTask("copy", num_symbols=4)
    good = synthetic_metrics(CopyOracle(task.vocab_size), task, [1, 4], samples=10)
    assert good == [_row(1, 10, 10, 10), _row(4, 10, 40, 40)]
    bad = synthetic_metrics(CopyOracle(task.vocab_size, wrong_last=True), task, [1, 4], samples=10)
    # Last of n answer tokens wrong: exact match 0, token accuracy (n - 1) / n.
    assert bad == [_row(1, 0, 10, 0), _row(4, 0, 40, 30)]
    assert bad[1]["token_accuracy"] == 0.75


class Unigram(nn.Module):
    """Context-free logits: the same distribution at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, tokens, positions=None):
        return self.logits.expand(*tokens.shape, -1)


def test_lm_metrics_score_the_same_test_tokens():
    g = torch.Generator().manual_seed(0)
    text = "".join("abcd"[i] for i in torch.randint(0, 4, (2000,), generator=g).tolist())
    corpus = CharCorpus.from_text(text, segments=4, test_context=16, test_scored=32, val_context=4, val_scored=8)
    # Uniform logits: perplexity is the vocabulary size exactly, at every length.
    uni = lm_metrics(Unigram(torch.zeros(4)), corpus, [4, 8, 16], stride=2)
    for m in uni:
        assert m["ppl"] == pytest.approx(4.0) and m["ppl_sliding"] == pytest.approx(4.0)
        assert m["tokens"] == 128 and m["segment_tokens"] == 32
        assert m["nll_segments"] == pytest.approx([32 * math.log(4)] * 4)
    # A context-free model: exp(mean NLL) of exactly the 4 x 32 scored test tokens, per segment too.
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    scored = corpus.test.tokens[:, 16:]  # [4, 32]
    per_segment = nn.functional.cross_entropy(logits.expand(128, 4), scored.reshape(-1), reduction="none")
    expected = per_segment.double().reshape(4, 32).sum(dim=1)  # [4]
    for m in lm_metrics(Unigram(logits), corpus, [4, 8, 16], stride=4):
        assert m["ppl"] == pytest.approx(math.exp(float(expected.sum()) / 128), rel=1e-6)
        assert m["ppl_sliding"] == pytest.approx(m["ppl"], rel=1e-6)
        assert m["nll_segments"] == pytest.approx(expected.tolist(), rel=1e-6)
        assert m["nll_sliding_segments"] == pytest.approx(expected.tolist(), rel=1e-6)
    with pytest.raises(ValueError, match="do not tile"):
        lm_metrics(Unigram(logits), corpus, [5], stride=1)
    with pytest.raises(ValueError, match="context"):
        lm_metrics(Unigram(logits), corpus, [32], stride=1)


def test_random_positions_sorted_distinct_in_range():
    pos = random_positions(64, 10, 40, torch.Generator().manual_seed(0))
    assert pos.shape == (64, 10)
    assert (pos[:, 1:] > pos[:, :-1]).all() and pos.min() >= 0 and pos.max() < 40
    assert pos.max() > 30  # uses the larger range, not arange
    with pytest.raises(ValueError, match="distinct"):
        random_positions(1, 5, 4, torch.Generator())


# -- the harness end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_train_resume_identical_and_skip(tmp_path):
    cfg = _cfg()
    full, skipped = train_run(cfg, tmp_path / "a")
    assert not skipped
    assert set(full) == {*KEYS, *PROVENANCE_KEYS, "validation", "probes"}
    assert full["train_step"] == "reference"  # 30 steps: "auto" compiles only runs of AUTO_MIN_STEPS or more
    assert full["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert [m["length"] for m in full["metrics"]] == [1, 2, 3, 4, 5, 6]  # 1..L, inside (L, 2L), 2L
    assert full["task"] == "copy" and full["encoding"] == "sinusoidal" and full["seed"] == 0
    assert full["train_length"] == 3 and full["torch_version"] == torch.__version__
    assert read_results(tmp_path / "a") == [full]

    class Crash(Exception):
        pass

    def crash_at_15(step, total, loss):
        if step == 15:
            raise Crash

    with pytest.raises(Crash):
        train_run(cfg, tmp_path / "b", on_step=crash_at_15)
    assert not (tmp_path / "b" / "results.jsonl").exists()
    assert torch.load(checkpoint_path(tmp_path / "b", cfg.run_id), weights_only=True)["step"] == 10
    resumed, skipped = train_run(cfg, tmp_path / "b")
    assert not skipped and resumed["metrics"] == full["metrics"]

    again, skipped = train_run(cfg, tmp_path / "b")
    assert skipped and again == resumed
    assert len((tmp_path / "b" / "results.jsonl").read_text().splitlines()) == 1


def test_lm_run_and_randomized_positions(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    cfg = _cfg(
        task={
            "name": "text",
            "text_path": str(text),
            "train_length": 8,
            "eval_factors": [1, 2, 4],
            "eval_segments": 2,
            "eval_tokens": 64,
        },
        train={"steps": 12, "randomized_positions": True},
    )
    rec, _ = train_run(cfg, tmp_path)
    assert rec["task"] == "text:corpus.txt" and rec["encoding"] == "sinusoidal+randpos"
    assert [m["length"] for m in rec["metrics"]] == [8, 16, 32]
    assert all(m["ppl"] > 1 and m["ppl_sliding"] > 1 for m in rec["metrics"])
    assert [m["length"] for m in rec["metrics_random"]] == [8, 16, 32]
    assert rec["corpus"]["test_tokens"] == 64 and rec["corpus"]["validation_tokens"] == 16


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_then_resume_gives_same_metrics(tmp_path):
    cfg = _cfg(train={"steps": 400, "checkpoint_every": 5})
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")  # JSON is YAML
    ckpt = checkpoint_path(tmp_path / "killed", cfg.run_id)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "posenc.cli",
            "train",
            "--config",
            str(tmp_path / "run.yaml"),
            "--out",
            str(tmp_path / "killed"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the subprocess never wrote a checkpoint"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step
    resumed, _ = train_run(cfg, tmp_path / "killed")
    clean, _ = train_run(cfg, tmp_path / "clean")
    assert resumed["metrics"] == clean["metrics"]


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": {"name": "cpy"}}, "unknown task 'cpy'"),
        ({"model": {"encoding": "sinusoid"}}, "unknown encoding 'sinusoid'"),
        ({"task": {"train_length": 0}}, "train_length must be > 0"),
        ({"task": {"train_length": -3}}, "train_length must be > 0"),
        ({"train": {"stepz": 3}}, r"unknown key\(s\) \['stepz'\] in config section 'train'"),
        ({"optimizer": {}}, r"unknown key\(s\) \['optimizer'\]"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"task": {"name": "text", "text_path": None}}, "needs text_path"),
    ],
)
def test_config_errors(change, message):
    d = json.loads(json.dumps(TINY))
    for k, v in change.items():
        d.setdefault(k, {}).update(v)
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(d)


def _cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_cli_errors_are_one_line(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("train:\n  steps: 3\n  colour: red\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    text_cfg = tmp_path / "text.yaml"
    for path, msg in [(tmp_path / "missing.txt", "does not exist"), (empty, "is empty")]:
        text_cfg.write_text(f"task: {{name: text, text_path: '{path}'}}\n", encoding="utf-8")
        code, out = _cli(["train", "--config", str(text_cfg), "--out", str(tmp_path / "r")])
        assert code == 2 and msg in out and "Traceback" not in out
    cases = [
        (["train", "--config", str(bad_key), "--out", str(tmp_path / "r")], "unknown key(s) ['colour']"),
        (["train", "--config", str(tmp_path / "nope.yaml")], "does not exist"),
        (["study", "--encodings", "sinusoidal,nope", "--out", str(tmp_path / "s")], "unknown encoding 'nope'"),
        (["study", "--tasks", "copy,poetry", "--out", str(tmp_path / "s")], "unknown task 'poetry'"),
        (["evaluate", str(tmp_path / "none.pt")], "does not exist"),
    ]
    for args, msg in cases:
        code, out = _cli(args)
        assert code == 2, out
        assert msg in out and "Traceback" not in out
        assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_corrupt_checkpoint_and_results_are_clear_errors(tmp_path):
    cfg = _cfg()
    ckpt = checkpoint_path(tmp_path, cfg.run_id)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or truncated.*delete it"):
        train_run(cfg, tmp_path)
    assert not (tmp_path / "results.jsonl").exists()
    ckpt.unlink()
    rec, _ = train_run(cfg, tmp_path)
    # A truncated checkpoint (a copy cut in half) is detected the same way.
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    code, out = _cli(["evaluate", str(ckpt)])
    assert code == 2 and "corrupt or truncated" in out
    # A results file with a half line is refused, not silently extended.
    results = tmp_path / "results.jsonl"
    results.write_text(results.read_text() + '{"run_id": "x", "ta', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        read_results(tmp_path)
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        append_result(tmp_path, rec)


def test_load_config_yaml_and_study_plan(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  name: reverse\n  train_length: 5\nmodel:\n  encoding: none\n", encoding="utf-8")
    cfg = load_config(p)
    assert cfg.task.name == "reverse" and cfg.model.encoding == "none" and cfg.train.steps == 1000
    configs, _ = plan_study("quick", encodings=["sinusoidal", "none+randpos"], tasks=["copy"], seeds=[0, 1], steps=7)
    assert [(c.encoding_label, c.train.seed, c.train.steps) for c in configs] == [
        ("sinusoidal", 0, 7),
        ("sinusoidal", 1, 7),
        ("none+randpos", 0, 7),
        ("none+randpos", 1, 7),
    ]
    assert len({c.run_id for c in configs}) == 4
    with pytest.raises(ValueError, match="unknown preset"):
        plan_study("huge")


@pytest.mark.slow
def test_cli_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    args = ["study", "--preset", "smoke", "--encodings", "sinusoidal,none", "--tasks", "copy", "--out", str(out)]
    args.append("--no-report")  # the HTML report has its own tests (tests/test_report.py)
    code, text = _cli(args)
    assert code == 0, text
    recs = read_results(out)
    assert [r["encoding"] for r in recs] == ["sinusoidal", "none"]
    assert (out / "results.md").exists() and (out / "plots" / "copy_exact_match.png").stat().st_size > 1000
    assert "copy: exact match by length" in (out / "results.md").read_text()
    code, text = _cli(args)  # re-run: everything skipped, same file
    assert code == 0 and len(read_results(out)) == 2
    (out / "results.md").unlink()
    code, text = _cli(["study", "--summarize-only", "--no-report", "--out", str(out)])
    assert code == 0 and (out / "results.md").exists() and len(read_results(out)) == 2
    code, text = _cli(["study", "--summarize-only", "--no-report", "--out", str(tmp_path / "empty")])
    assert code == 2 and "no results" in text


@pytest.mark.parametrize("encoding", ["sinusoidal", "learned", "none", "normalized"])
def test_padding_after_an_example_does_not_change_it(encoding):
    # Training mixes lengths in one right-padded batch: with the causal mask, the real
    # tokens' logits must equal those of the example alone (normalized as the study builds
    # it: a causal model needs a fixed length, the longest training input; per-row positions).
    from posenc.experiments.study import normalized_length
    from posenc.experiments.train import build_model

    params = {"length": normalized_length("copy", 4, 5)} if encoding == "normalized" else {}
    cfg = _cfg(model={"encoding": encoding, "encoding_params": params})
    task = SyntheticTask("copy", num_symbols=4)
    torch.manual_seed(0)
    model = build_model(cfg, task.vocab_size, 64).eval()
    ex, pos = task.sample_mixed(torch.tensor([2, 5]), torch.Generator().manual_seed(1))
    shared = torch.arange(ex.tokens.shape[1])
    batch = model(ex.tokens, pos if encoding == "normalized" else shared)
    alone = model(ex.tokens[:1, :6])
    torch.testing.assert_close(batch[:1, :6], alone)


def _rec(task, enc, seed, accs, L=2):
    metrics = [{"length": n, "exact_match": a, "token_accuracy": a} for n, a in accs.items()]
    return {
        "run_id": f"{task}{enc}{seed}",
        "task": task,
        "encoding": enc,
        "seed": seed,
        "train_length": L,
        "config": {},
        "git_commit": "x",
        "torch_version": "x",
        "wall_time_s": 1.0,
        "metrics": metrics,
    }


def test_tables_and_mean_ranks_by_hand():
    from posenc.experiments.summary import mean_ranks, tables

    recs = [
        _rec("copy", "a", 0, {1: 1.0, 2: 1.0, 4: 0.9}),
        _rec("copy", "a", 1, {1: 1.0, 2: 0.5, 4: 0.7}),  # in distribution 0.75: did not learn
        _rec("copy", "b", 0, {1: 1.0, 2: 1.0, 4: 0.2}),
        _rec("copy", "c", 0, {1: 1.0, 2: 1.0, 4: 0.2}),
        _rec("sort", "a", 0, {1: 1.0, 2: 1.0, 4: 0.1}),
        _rec("sort", "b", 0, {1: 1.0, 2: 1.0, 4: 0.3}),
        _rec("sort", "c", 0, {1: 1.0, 2: 1.0, 4: 0.5}),
    ]
    # copy at 2L over the learned runs: a 0.9 (seed 1 left out), b 0.2, c 0.2 -> ranks 1, 2.5, 2.5;
    # sort: a 0.1, b 0.3, c 0.5 -> 3, 2, 1.
    ranked = mean_ranks(recs)
    assert [(r[0], r[1]) for r in ranked.rows] == [("c", "1.75"), ("a", "2.00"), ("b", "2.25")]
    assert ranked.rows[1][4:] == ["0.900 (1 of 2 learned)", "0.100"]
    # per seed: only seed 0 is common to every encoding of both tasks (so the same as the means here).
    assert [r[2] for r in ranked.rows] == ["1.75", "2.00", "2.25"] and ranked.columns[2] == "per-seed rank (1 seed)"
    # two seeds that disagree: a wins seed 0, b wins seed 1 -> per-seed ranks 1 and 2 each
    two = [
        _rec("copy", "a", 0, {1: 1.0, 4: 0.9}),
        _rec("copy", "a", 1, {1: 1.0, 4: 0.1}),
        _rec("copy", "b", 0, {1: 1.0, 4: 0.5}),
        _rec("copy", "b", 1, {1: 1.0, 4: 0.5}),
    ]
    assert [r[1:3] for r in mean_ranks(two).rows] == [["1.50", "1.50 ± 0.71"]] * 2
    em = tables(recs)[0]
    assert em.title.endswith("on 1..2 (mean ± std over 1–2 seeds; a value without ± is 1 seed)")
    assert tables(recs)[2].title.endswith("(1 seed)")  # sort, exact match
    assert em.columns == ["encoding", "1..2", "2", "4"]
    # a over two seeds: in-distribution mean of (1.0 + 1.0)/2 and (1.0 + 0.5)/2; std of (1.0, 0.75).
    assert em.rows[0] == ["a", "0.88 ± 0.18", "0.75 ± 0.35", "0.80 ± 0.14"]


def test_tables_order_does_not_depend_on_record_order():
    from posenc.experiments.summary import group

    encodings = ("xpos", "rope+randpos", "alibi", "rope", "cope", "sinusoidal")
    recs = [_rec(t, e, 0, {1: 1.0}) for t in ("count", "copy") for e in encodings]
    want = {"copy": ["sinusoidal", "rope", "rope+randpos", "alibi", "cope", "xpos"]}
    want["count"] = want["copy"]
    for order in (recs, recs[::-1]):
        got = group(order)
        assert list(got) == ["copy", "count"]  # posenc.experiments.config.TASKS order
        assert {t: list(by_enc) for t, by_enc in got.items()} == want


def test_documented_configs_load():
    docs = Path(__file__).resolve().parents[1] / "docs" / "configs"
    configs = {p.stem: load_config(p) for p in sorted(docs.glob("*.yaml"))}
    assert len(configs) == 3
    # The documented copy config is exactly one run of the quick preset.
    quick, _ = plan_study("quick", encodings=["sinusoidal"], tasks=["copy"])
    assert configs["copy_sinusoidal"] == quick[0]
    # The T5 experiment of docs/results.md is the full preset's run at the rate the sweep
    # chose for t5 on shakespeare (its records: tests/test_results_doc.py) but for max_distance.
    full, _ = plan_study("full", encodings=["t5"], tasks=["shakespeare"], seeds=[0])
    assert [c.train.lr for c in full] == [1e-3, 3e-3, 1e-2]
    t5 = configs["shakespeare_t5_max_distance_64"]
    assert t5.model.encoding_params == {"max_distance": 64}
    assert dataclasses.replace(t5, model=dataclasses.replace(t5.model, encoding_params={})) == full[2]


def test_unbuildable_preset_encoding_is_left_out_with_reason_but_named_one_is_an_error():
    # rope2d needs grid_width (a 2-D grid), which no sequence preset gives it.
    configs, left_out = plan_study("full", tasks=["copy"], seeds=[0])
    assert "rope2d" not in [c.encoding_label for c in configs]
    assert any(m.startswith("rope2d (") and "grid_width" in m for m in left_out)
    assert "sinusoidal+randpos" in [c.encoding_label for c in configs]
    with pytest.raises(ValueError, match="encoding 'rope2d' cannot be built for task 'copy'"):
        plan_study("quick", encodings=["rope2d"], tasks=["copy"])


def test_resume_from_checkpoint_saved_before_a_config_field_existed(tmp_path):
    # A checkpoint written before TrainConfig gained a field (here init_from) resumes: the
    # saved config is normalized through the dataclasses before it is compared.
    cfg = _cfg()

    class Stop(Exception):
        pass

    def stop(step, total, loss):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        train_run(cfg, tmp_path, on_step=stop)
    ckpt = checkpoint_path(tmp_path, cfg.run_id)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["train"].pop("init_from", None)
    state["config"]["train"]["threads"] = 2  # and another thread count
    torch.save(state, ckpt)
    rec, skipped = train_run(cfg, tmp_path)
    assert not skipped and rec["metrics"] == train_run(cfg, tmp_path / "clean")[0]["metrics"]


def test_a_study_with_runs_that_did_not_learn_warns(tmp_path):
    """Runs below the in-distribution bar are named in results.md and by the CLI."""
    from posenc.experiments.summary import LEARNED_BAR, not_learned
    from posenc.pipeline.study import write_study_outputs

    def record(encoding, at_l):
        return {
            "run_id": f"copy__{encoding}",
            "task": "copy",
            "encoding": encoding,
            "seed": 0,
            "train_length": 2,
            "metrics": [
                {"length": n, "exact_match": at_l if n <= 2 else 0.1, "token_accuracy": at_l} for n in (1, 2, 4)
            ],
        }

    records = [record("rope", 1.0), record("nope-ish", LEARNED_BAR - 0.05)]
    assert [r["encoding"] for r in not_learned(records)] == ["nope-ish"]
    out = write_study_outputs(tmp_path, records, report=False)
    text = out["markdown"].read_text(encoding="utf-8")
    assert "1 run(s) did not learn in distribution" in text and "nope-ish on copy (seed 0)" in text
    assert "rope on copy" not in text.split("**Warning:**")[1].split("\n")[0]
    # the mean rank over (L, 2L] ranks rope alone and names nope-ish as not learned
    assert "| rope | 1.00 | 1.00 | 1 | 1.000 |" in text
    assert "| nope-ish | did not learn | - | 0 | did not learn (0.85) |" in text
