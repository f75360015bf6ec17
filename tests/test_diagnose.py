"""The mechanism probes: each intervention is what it says on every attention backend
(a window is attention over the last W keys, a temperature multiplies the whole score,
a shift changes only the positions), the attention statistics equal a hand computation,
the probes of trained runs agree with the main evaluation, and ``posenc diagnose`` runs
on a study folder."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

import posenc
from posenc import flex
from posenc.attention import Attention, Intervention
from posenc.cli_diagnose import diagnose
from posenc.experiments import diagnose as dg
from posenc.experiments.config import config_from_dict
from posenc.experiments.diagnose_runs import PROBES_FILE, checkpoint_probes, study_probes
from posenc.experiments.diagnose_summary import (
    attribution,
    attribution_table,
    hypothesis_table,
    recoveries,
    recovery_tables,
)
from posenc.experiments.evaluate import lm_metrics, synthetic_metrics
from posenc.experiments.train import build_model, checkpoint_path, setup, train_run

BACKENDS = ("sdpa", "flex", "explicit")
ENCODINGS = {"none": {}, "rope": {}, "alibi": {}, "t5": {"num_buckets": 8, "max_distance": 20}, "cope": {}}


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are tiny: one thread is fastest, and threads spin against each other
    on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention without torch.compile (the same semantics, seconds faster); the
    compiled kernel is checked in the slow test below."""
    from torch.nn.attention.flex_attention import flex_attention

    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile"
            return flex_attention(*args, **kwargs)

    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: run)


def _attention(name: str, backend: str, *, causal: bool = True, kv_heads: int = 2) -> Attention:
    torch.manual_seed(0)
    pe = posenc.registry.create_for_model(name, ENCODINGS[name], dim=32, num_heads=4, head_dim=8, max_len=64)
    with torch.no_grad():
        for p in pe.parameters():
            p.add_(torch.rand_like(p) * 0.3)
    kind = "sdpa" if backend == "explicit" else backend
    return Attention(32, 4, num_kv_heads=kv_heads, pe=pe, causal=causal, backend=kind).eval()


def _by_hand(attn: Attention, x: torch.Tensor, keys, temperature: float = 1.0) -> torch.Tensor:
    """Attention of every query over the keys ``keys(i, s)`` only, one query at a time:
    ``softmax(temperature * (q_i k_Jᵀ / sqrt(d) + bias[i, J])) v_J`` through the hooks."""
    b, s, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(b, s, h, d).transpose(1, 2)  # [b, h, s, d]
    k = attn.k_proj(x).view(b, s, attn.num_kv_heads, d).transpose(1, 2)  # [b, h_kv, s, d]
    v = attn.v_proj(x).view(b, s, attn.num_kv_heads, d).transpose(1, 2)
    pos = torch.arange(s)
    q, k = attn.pe.rotate(q, k, pos, pos)
    bias = attn.pe.bias(pos, pos, q=q, k=k)
    k = k.repeat_interleave(h // attn.num_kv_heads, dim=1)  # [b, h, s, d]
    v = v.repeat_interleave(h // attn.num_kv_heads, dim=1)
    rows = []
    for i in range(s):
        J = torch.tensor(keys(i, s))
        scores = (q[:, :, i : i + 1] @ k[:, :, J].transpose(-1, -2)).squeeze(2) / math.sqrt(d)  # [b, h, |J|]
        if bias is not None:
            scores = scores + (bias[..., i, J] if bias.dim() == 3 else bias[:, :, i, J])
        p = torch.softmax(temperature * scores, dim=-1)
        rows.append((p[..., None] * v[:, :, J]).sum(2))  # [b, h, d]
    out = torch.stack(rows, dim=2)  # [b, h, s, d]
    return attn.out_proj(out.transpose(1, 2).reshape(b, s, h * d))


def _run(attn: Attention, backend: str, x: torch.Tensor, iv: Intervention) -> torch.Tensor:
    seen = []
    if backend == "explicit":
        iv = Intervention(window=iv.window, temperature=iv.temperature, observe=lambda m, p: seen.append(p))
    out = attn(x, intervention=iv)
    assert len(seen) == (1 if backend == "explicit" else 0)
    return out


def _cases():
    for name in ENCODINGS:
        for backend in BACKENDS:
            if not (name == "cope" and backend == "flex"):  # CoPE has no score_mod (docs/bias.md)
                yield name, backend


@pytest.mark.parametrize("name,backend", list(_cases()))
@torch.no_grad()
def test_window_is_attention_over_the_last_w_keys(name, backend, eager_flex):
    attn = _attention(name, backend)
    x = torch.randn(2, 21, 32)
    for w in (1, 6):
        out = _run(attn, backend, x, Intervention(window=w))
        ref = _by_hand(attn, x, lambda i, s, w=w: range(max(0, i - w + 1), i + 1))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a window as long as the input changes nothing
    torch.testing.assert_close(_run(attn, backend, x, Intervention(window=21)), attn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_window_of_a_bidirectional_attention(backend, eager_flex):
    attn = _attention("alibi", backend, causal=False)
    x = torch.randn(2, 29, 32)
    out = _run(attn, backend, x, Intervention(window=4))
    ref = _by_hand(attn, x, lambda i, s: range(max(0, i - 3), min(s, i + 4)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,backend", list(_cases()))
@torch.no_grad()
def test_temperature_multiplies_the_whole_score(name, backend, eager_flex):
    attn = _attention(name, backend)
    x = torch.randn(2, 19, 32)
    for tau in (0.5, 1.7):
        out = _run(attn, backend, x, Intervention(temperature=tau))
        ref = _by_hand(attn, x, lambda i, s: range(i + 1), temperature=tau)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out = _run(attn, backend, x, Intervention(window=6, temperature=1.3))
    ref = _by_hand(attn, x, lambda i, s: range(max(0, i - 5), i + 1), temperature=1.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("name", ["alibi", "rope"])
@torch.no_grad()
def test_interventions_through_the_kv_cache_equal_the_full_forward(name, backend):
    torch.manual_seed(0)
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=40, dim=32, num_heads=4, encoding=name)).eval()
    tokens = torch.randint(0, 40, (2, 20))
    base = Intervention(window=7, temperature=1.4, offset=5)
    iv = base if backend == "sdpa" else Intervention(window=7, temperature=1.4, offset=5, observe=lambda m, p: None)
    full = model(tokens, intervention=iv)
    cache = model.new_cache()
    steps = [model(tokens[:, :12], cache=cache, intervention=iv)]
    steps += [model(tokens[:, t : t + 1], cache=cache, intervention=iv) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sinusoidal", "learned", "t5", "rope", "alibi", "none"])
@torch.no_grad()
def test_shift_changes_only_the_positions(name):
    torch.manual_seed(0)
    cfg = posenc.TransformerConfig(vocab_size=40, dim=32, num_heads=4, encoding=name, max_len=64)
    model = posenc.Transformer(cfg).eval()
    seen = {"tokens": [], "positions": []}
    model.tok_emb.register_forward_pre_hook(lambda m, args: seen["tokens"].append(args[0].clone()))
    embed = model.pe.embed

    def spy(x, positions):
        seen["positions"].append(positions.clone())
        return embed(x, positions)

    model.pe.embed = spy
    tokens = torch.randint(0, 40, (2, 20))
    shifted = model(tokens, intervention=Intervention(offset=13))
    explicit = model(tokens, torch.arange(13, 33))
    assert torch.equal(shifted, explicit)
    assert all(torch.equal(t, tokens) for t in seen["tokens"])
    assert torch.equal(seen["positions"][0], torch.arange(13, 33))
    plain = model(tokens)
    if model.pe.translation_invariant:  # scores read only position differences: the shift is invisible
        torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-5)
    else:
        assert not torch.allclose(shifted, plain, atol=1e-3)


def test_no_intervention_is_the_default_path_bit_for_bit():
    torch.manual_seed(0)
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=40, dim=32, num_heads=4, encoding="t5")).eval()
    tokens = torch.randint(0, 40, (2, 25))
    with torch.no_grad():
        assert torch.equal(model(tokens, intervention=Intervention()), model(tokens))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"window": 0}, ValueError, "window"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": "2"}, TypeError, "temperature"),
        ({"offset": -1}, ValueError, "offset"),
        ({"observe": 3}, TypeError, "observe"),
    ],
)
def test_bad_interventions_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Intervention(**kwargs)


def test_entropy_and_near_mass_by_hand():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])[None, None]  # [1, 1, 3, 3]
    ent = dg.attention_entropy(probs)[0, 0]
    expected = [0.0, math.log(2), -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))]
    assert ent.tolist() == pytest.approx(expected, abs=1e-6)
    assert dg.near_mass(probs, 2)[0, 0].tolist() == pytest.approx([1.0, 1.0, 0.8], abs=1e-6)
    assert dg.near_mass(probs, 1)[0, 0].tolist() == pytest.approx([1.0, 0.5, 0.5], abs=1e-6)
    # two queries after 4 cached keys: query i sits at key index 4 + i
    cached = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.25, 0.25, 0.5]])[None, None]
    assert dg.near_mass(cached, 2)[0, 0].tolist() == pytest.approx([0.4, 0.75], abs=1e-6)  # keys {3, 4}, {4, 5}


def test_attention_stats_average_only_the_scored_queries():
    torch.manual_seed(0)
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=30, dim=16, num_heads=2, encoding="alibi")).eval()
    tokens = torch.randint(0, 30, (3, 9))
    rows = torch.zeros(3, 9, dtype=torch.bool)
    rows[:, 4:] = True
    rows[1, 6] = False
    stats = dg.AttentionStats(model, 3)
    stats.rows = rows
    kept = []
    with torch.no_grad():
        model(tokens, intervention=Intervention(observe=lambda m, p: (kept.append(p), stats(m, p))))
    summary = stats.summary(9, 9)
    for layer, p in enumerate(kept):
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [b, h, s]
        near = torch.stack([p[..., i, max(0, i - 2) : i + 1].sum(-1) for i in range(9)], -1)  # [b, h, s]
        for head in range(2):
            assert summary["entropy"][layer][head] == pytest.approx(float(ent[:, head][rows].mean()), abs=1e-5)
            assert summary["near_mass"][layer][head] == pytest.approx(float(near[:, head][rows].mean()), abs=1e-5)
    logs = torch.arange(1, 10).double().log()  # query i sees i + 1 keys
    assert summary["uniform_entropy"] == pytest.approx(float(logs.expand(3, 9)[rows].mean()), abs=1e-6)
    assert summary["queries"] == int(rows.sum())


# -- trained runs ------------------------------------------------------------------------------

SYNTHETIC = {
    "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 8},
    "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5, "threads": 1},
}
CORPUS = {
    "task": {
        "name": "shakespeare",
        "train_length": 8,
        "max_chars": 100_000,
        "eval_factors": [1, 2, 4],
        "eval_segments": 2,
        "eval_tokens": 256,
    },
    "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5, "threads": 1},
}


def _config(base: dict, encoding: str, seed: int = 0, **params):
    d = {k: dict(v) for k, v in base.items()}
    d["model"].update(encoding=encoding, encoding_params=params)
    d["train"]["seed"] = seed
    return config_from_dict(d)


def _untrained(config):
    """A run's model (initial weights, perturbed so that predictions vary) and its setup."""
    run_setup = setup(config)
    torch.manual_seed(1)
    model = build_model(config, run_setup.vocab_size, run_setup.max_len).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model, run_setup


def test_probes_of_a_synthetic_run():
    model, run_setup = _untrained(_config(SYNTHETIC, "sinusoidal"))
    probes = dg.probe_metrics(model, run_setup, samples=96, attention_samples=40)
    json.dumps(probes, allow_nan=False)  # JSON-ready
    L, task = 3, run_setup.task
    assert probes["kind"] == "synthetic" and probes["window"] == task.sequence_length(L) - 1 == 7
    assert [e["length"] for e in probes["lengths"]] == [6, 12, 24]
    ref = synthetic_metrics(model, task, [L, 24], samples=96, seed=0)  # the main evaluation's examples
    assert {k: probes["reference"][k] for k in ref[0]} == ref[0]
    at_24 = probes["lengths"][-1]
    assert {k: at_24["none"][k] for k in ref[1] if k != "length"} == {k: v for k, v in ref[1].items() if k != "length"}
    assert 0 < at_24["none"]["token_hits"] < at_24["none"]["tokens"]  # the comparison is not 0 == 0
    assert at_24["offset"] == task.sequence_length(24) - task.sequence_length(L)
    assert at_24["tau"] == pytest.approx(math.log(task.sequence_length(24) - 1) / math.log(7))
    for entry in probes["lengths"]:
        assert set(dg.CONDITIONS) <= set(entry)
        assert entry["shifted"]["samples"] == 96 and entry["shifted"]["tokens"] == ref[0]["tokens"]
    # shifted = the examples at L scored with positions offset by hand
    hits = 0
    with torch.no_grad():
        for ex in dg.probe_examples(task, L, 96, 0):
            inputs = ex.tokens[:, :-1]
            pred = model(inputs, torch.arange(inputs.shape[1]) + at_24["offset"]).argmax(-1)
            hits += int(((pred == ex.tokens[:, 1:]) & ex.answer_mask[:, 1:]).sum())
    assert at_24["shifted"]["token_hits"] == hits
    assert at_24["shifted"]["token_hits"] != probes["reference"]["token_hits"]  # sinusoidal: positions matter
    assert [a["length"] for a in probes["attention"]] == [3, 6, 12, 24]
    assert probes["attention"][0]["queries"] == 40 * L  # copy: L answer tokens per example
    assert probes["attention"][0]["near_mass"] == [[pytest.approx(1.0, abs=1e-5)] * 2]  # W covers all of L
    assert probes["attention"][-1]["near_mass"][0][0] < 1.0


@pytest.mark.parametrize(
    "encoding,params", [("alibi", {}), ("rope", {"rope_type": "dynamic", "factor": 2.0, "max_len": 8})]
)
def test_probes_of_a_corpus_run_match_the_main_evaluation(encoding, params):
    """Dynamic NTK RoPE depends on the length: scored prefix by prefix, as the main evaluation."""
    model, run_setup = _untrained(_config(CORPUS, encoding, **params))
    assert run_setup.length_dependent == (encoding == "rope")
    probes = dg.probe_metrics(model, run_setup, attention_tokens=64)
    main = {m["length"]: m for m in lm_metrics(model, run_setup.corpus, [8, 32], stride=run_setup.stride)}
    assert probes["kind"] == "lm" and probes["window"] == 8
    assert probes["reference"]["nll_segments"] == pytest.approx(main[8]["nll_segments"], rel=1e-6)
    at_32 = probes["lengths"][-1]
    assert at_32["none"]["nll_segments"] == pytest.approx(main[32]["nll_segments"], rel=1e-6)
    assert at_32["none"]["ppl"] == pytest.approx(main[32]["ppl"], rel=1e-6)
    assert at_32["offset"] == 24 and at_32["tau"] == pytest.approx(math.log(32) / math.log(8))
    assert at_32["shifted"]["tokens"] == at_32["none"]["tokens"] == 256
    assert probes["attention"][-1]["queries"] == 64  # two chunks of 32


def test_recovery_is_the_share_of_the_drop():
    def metrics(em):
        return {"exact_match": em, "token_accuracy": em}

    probes = {
        "kind": "synthetic",
        "train_length": 4,
        "reference": metrics(1.0),
        "lengths": [
            {
                "length": 8,
                "none": metrics(0.2),
                "shifted": metrics(0.3),
                "window": metrics(0.9),
                "temperature": metrics(0.4),
                "window_temperature": metrics(1.0),
            },
            {"length": 16, **{c: metrics(0.95) for c in dg.CONDITIONS}},
        ],
    }
    rec = recoveries(probes)
    assert rec[8] == pytest.approx({"shifted": 0.125, "window": 0.875, "temperature": 0.25, "window_temperature": 1.0})
    assert rec[16] is None  # 0.05 below L: no drop to explain
    assert attribution(rec[8]) == "positions + distances+dilution"
    assert attribution({"shifted": 1.0, "window": 0.9, "temperature": 0.6, "window_temperature": 1.0}) == "dilution"
    assert attribution({"shifted": 0.9, "window": 0.1, "temperature": 0.1, "window_temperature": 0.2}) == "unexplained"
    records = [{"task": "copy", "encoding": "x", "seed": s, "train_length": 4, "probes": probes} for s in (0, 1)]
    (table, _) = recovery_tables(records)
    assert table.rows[0][:5] == ["x", "2/2", "1.00", "0.20", "0.12 [0.12, 0.12]"]
    assert attribution_table(records).rows == [["x", "2L: positions + distances+dilution; 4L: no drop"]]
    # the hypotheses' table: the one cell with a drop is explained by positions and by distances+dilution
    unexplained = {**probes, "lengths": [{**probes["lengths"][0], "shifted": metrics(0.9), "window": metrics(0.2)}]}
    records.append({"task": "copy", "encoding": "y", "seed": 0, "train_length": 4, "probes": unexplained})
    rows = {row[0]: row[3:] for row in hypothesis_table(records).rows}
    assert rows["unseen positions"] == ["1 of 2", "x (copy 2L)"]
    assert rows["unseen distances (the window also removes dilution)"] == ["1 of 2", "x (copy 2L)"]
    assert rows["attention dilution"] == ["0 of 2", "none"]
    assert rows["none of the three"] == ["1 of 2", "y (copy 2L)"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A smoke study folder: copy with two encodings (two seeds of one) and a corpus run."""
    folder = tmp_path_factory.mktemp("study")
    configs = [
        _config(SYNTHETIC, "sinusoidal"),
        _config(SYNTHETIC, "sinusoidal", seed=1),
        _config(SYNTHETIC, "alibi"),
        _config(CORPUS, "alibi"),
    ]
    for cfg in configs:
        train_run(cfg, folder)
    return folder, configs


@pytest.mark.slow
def test_study_probes_are_saved_and_read_back(study, tmp_path):
    folder, configs = study
    own, skipped = study_probes(folder)  # every record carries its probes: read, nothing written
    assert skipped == [] and not (folder / PROBES_FILE).exists()
    # Records written before probes existed: computed from the checkpoints, saved, read back.
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    lines = [json.loads(line) for line in (old / "results.jsonl").read_text().splitlines()]
    (old / "results.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "probes"}) + "\n" for r in lines)
    )
    records, skipped = study_probes(old)
    assert skipped == [] and len(records) == len(configs)
    assert [r["probes"] for r in records] == [r["probes"] for r in own]  # the same as at the end of training
    saved = [json.loads(line) for line in (old / PROBES_FILE).read_text().splitlines()]
    assert [s["run_id"] for s in saved] == [r["run_id"] for r in records]
    again, _ = study_probes(old, samples=64)  # read from probes.jsonl, not recomputed
    assert [r["probes"] for r in again] == [r["probes"] for r in records]
    single = checkpoint_probes(checkpoint_path(old, configs[2].run_id))
    assert single["probes"] == records[2]["probes"] and single["encoding"] == "alibi"


@pytest.mark.slow
def test_cli_diagnose_on_a_study_folder(study):
    folder, _ = study
    app = typer.Typer()
    app.command("diagnose")(diagnose)
    app.command("other")(lambda: None)  # two commands: "diagnose" stays a subcommand
    runner = CliRunner()
    help_text = runner.invoke(app, ["diagnose", "--help"]).output
    assert "window" in help_text and "temperature" in help_text and "shifted" in help_text
    result = runner.invoke(app, ["diagnose", str(folder), "--samples", "64"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "recovered by each intervention" in result.output and "attribution" in result.output
    assert "copy" in result.output and "shakespeare" in result.output
    md = runner.invoke(app, ["diagnose", str(folder), "--markdown", "--no-attention"], env={"COLUMNS": "80"})
    assert md.exit_code == 0, md.output
    assert "| encoding | seeds with a drop |" in md.output and "| hypothesis | sources |" in md.output
    assert "attention entropy" not in md.output
    bad = runner.invoke(app, ["diagnose", str(folder / "nothing.pt")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.slow
@torch.no_grad()
def test_compiled_flex_window_and_temperature():
    """The compiled FlexAttention kernel (not the eager reference) under both interventions."""
    torch.manual_seed(0)
    base = dict(vocab_size=40, dim=32, num_heads=4, encoding="alibi")
    sdpa = posenc.Transformer(posenc.TransformerConfig(**base)).eval()
    fx = posenc.Transformer(posenc.TransformerConfig(**base, backend="flex")).eval()
    fx.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 40, (2, 48))
    for iv in (Intervention(window=9), Intervention(temperature=1.6), Intervention(window=5, temperature=0.7)):
        torch.testing.assert_close(fx(tokens, intervention=iv), sdpa(tokens, intervention=iv), rtol=1e-4, atol=1e-5)
