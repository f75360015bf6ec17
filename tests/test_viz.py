"""Figures: every kind draws with labelled axes and a title, writes PNG and SVG, and
explains itself when it cannot draw. Toy rotary/bias encodings (registered only inside
a test) exercise the rotary and bias figures apart from the registered encodings."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch
from einops import rearrange
from typer.testing import CliRunner

import posenc
from posenc import analysis, registry
from posenc.analysis.attention import attention_weights
from posenc.base import Params, PositionalEncoding
from posenc.cli import app
from posenc.experiments.tiny import copy_batch
from posenc.pipeline import figures as pipeline_figures
from posenc.viz import figures


@dataclasses.dataclass(frozen=True)
class HeadDim(Params):
    head_dim: int


@dataclasses.dataclass(frozen=True)
class Heads(Params):
    num_heads: int
    causal: bool = False


class ToyRope(PositionalEncoding):
    name = "toy-rope"
    family = "rotary"
    Params: ClassVar[type[Params]] = HeadDim

    def _rot(self, x, pos):
        d = self.params.head_dim
        theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = pos.double()[:, None] * theta  # [s, d/2]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def rotate(self, q, k, q_positions, k_positions):
        return self._rot(q, q_positions), self._rot(k, k_positions)


class ToyBuckets(PositionalEncoding):
    """T5-like: distances 0..3 exact, then buckets [4, 8), [8, 16), [16, inf); a
    zero-initialized [buckets, heads] table (the probe randomizes constant tables)."""

    name = "toy-buckets"
    family = "bias"
    Params: ClassVar[type[Params]] = Heads

    def __init__(self, **params):
        super().__init__(**params)
        self.table = torch.nn.Parameter(torch.zeros(7, self.params.num_heads))

    def bias(self, q_positions, k_positions, *, q=None, k=None):
        d = (q_positions[:, None] - k_positions[None, :]).abs()  # [s_q, s_k]
        bucket = torch.where(d < 4, d, 4 + (d >= 8).long() + (d >= 16).long())
        return rearrange(self.table[bucket], "s t h -> h s t")


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "toy-rope", ToyRope)
    monkeypatch.setitem(registry._REGISTRY, "toy-buckets", ToyBuckets)


def _labelled(fig):
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        if ax.has_data():
            assert ax.get_xlabel() and ax.get_ylabel(), ax
    assert fig._suptitle is not None or any(ax.get_title() for ax in axes)


@pytest.mark.parametrize("kind", ["heatmap", "similarity"])
@pytest.mark.parametrize("name", ["binary", "sinusoidal", "learned"])
def test_per_encoding_figures(name, kind, tmp_path):
    fig = figures.plot(name, kind, horizon=64, dim=16, num_heads=2)
    _labelled(fig)
    for suffix in (".png", ".svg"):
        path = figures.save(fig, tmp_path / f"{name}-{kind}{suffix}")
        assert path.stat().st_size > 1000


def test_sine_similarity_title_reports_its_period():
    fig = figures.similarity("sine", dim=4, num_heads=1, horizon=100)
    assert "repeats every 32 positions" in fig.axes[0].get_title()


def test_global_figures():
    _labelled(figures.magnitude(["integer", "sinusoidal"], horizon=64))
    _labelled(figures.distance(["sinusoidal", "binary"], max_distance=32))


def test_rotary_and_bias_figures_with_toy_encodings(toys):
    for fig in (
        figures.rotation("toy-rope", head_dim=16),
        figures.wavelengths("toy-rope", head_dim=16, context=64),
        figures.decay("toy-rope", head_dim=16, max_distance=64),
        figures.bias_matrix("toy-buckets", length=24, num_heads=2),
        figures.distance(["toy-rope", "toy-buckets"], max_distance=32),
    ):
        _labelled(fig)
    # 16 dims = 8 planes; wavelengths 2 pi 10^(i/2) = 6.3, 19.9, 62.8, 198.7, ...: 5 exceed 64.
    assert figures.wavelengths("toy-rope", head_dim=16, context=64).axes[0].get_title().startswith("toy-rope: 5 of 8")
    fig = figures.buckets("toy-buckets", length=32, num_heads=2)
    # Distances 0, 1, 2, 3 and three log buckets: 7 shared parameters over 32 positions.
    assert "7 distinct biases" in fig._suptitle.get_text()


def test_unavailable_figures_say_why():
    missing = "never-registered-encoding"
    with pytest.raises(figures.FigureUnavailable, match="not registered"):
        figures.heatmap(missing)
    with pytest.raises(figures.FigureUnavailable, match="'sinusoidal' \\(additive\\)"):
        figures.bias_matrix("sinusoidal")
    with pytest.raises(figures.FigureUnavailable, match="rotation"):
        figures.rotation("sinusoidal")
    # Only the figures of an encoding's position signal (FIGURE_SIGNALS): no similarity
    # square for a bias, no bucket panel for a bias that never saturates, no heatmap of nothing.
    with pytest.raises(figures.FigureUnavailable, match="'alibi' \\(bias\\) carries it as 'bias'"):
        figures.similarity("alibi")
    with pytest.raises(figures.FigureUnavailable, match="shared bias"):
        figures.buckets("alibi")
    with pytest.raises(figures.FigureUnavailable, match="'none'"):
        figures.heatmap("none")
    with pytest.raises(ValueError, match="unknown kind"):
        figures.plot("sinusoidal", "nope")
    with pytest.raises(ValueError, match=".png or .svg"):
        figures.save(figures.heatmap("binary", horizon=8, dim=8, num_heads=1), "figure.jpg")


def test_scaling_figure_draws_every_rule():
    fig = figures.scaling(head_dim=64, factor=8.0, original=4096)
    _labelled(fig)
    lines = {ln.get_label().split(" ")[0]: ln.get_ydata() for ln in fig.axes[0].get_lines()}
    # one curve per rule of SCALING_RULES, the default (ratio 1) and the original-context line
    assert set(lines) == {"default", "original", *figures.SCALING_RULES}
    assert len(lines["default"]) == 64 // 2 and all(v == 1.0 for v in lines["default"])
    assert all(abs(v - 1 / 8) < 1e-6 for v in lines["linear"])  # PI: every frequency / factor
    assert abs(lines["llama3"][0] - 1.0) < 1e-6 and abs(lines["llama3"][-1] - 1 / 8) < 1e-6


def test_attention_weights_reproduce_the_layer_output(toys):
    cfg = posenc.TransformerConfig(vocab_size=20, dim=32, num_layers=2, num_heads=2, encoding="toy-buckets")
    model = posenc.Transformer(cfg).eval()
    tokens = copy_batch(2, 6, 20, torch.Generator().manual_seed(0))  # [2, 12]
    seen = {}
    blk = model.blocks[1].attn
    blk.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0]), with_kwargs=True)
    blk.register_forward_hook(lambda m, a, out: seen.update(out=out))
    w = attention_weights(model, tokens)  # [layers, b, h, s, s]
    assert w.shape == (2, 2, 2, 12, 12)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 2, 12))
    assert float(w.triu(1).abs().max()) == 0.0  # causal
    model(tokens)
    v = rearrange(blk.v_proj(seen["x"]), "b s (h d) -> b h s d", h=2)
    out = blk.out_proj(rearrange(w[1] @ v, "b h s d -> b s (h d)"))
    assert torch.allclose(out, seen["out"], atol=1e-5)


@pytest.mark.slow
def test_trained_attention_figure():
    fig = pipeline_figures.trained_attention("sinusoidal", steps=3, half=4)
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 8  # 2 layers x 4 heads
    with pytest.raises(ValueError, match="weights must be"):
        figures.attention(torch.zeros(2, 3, 4))


# -- the CLI --------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_analyze_prints_the_report_card():
    res = runner.invoke(app, ["analyze", "binary", "integer", "--horizon", "256"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "binary" in res.output and "integer" in res.output
    assert "2.83" in res.output  # binary: sqrt(8) jump from 127 to 128
    assert "255" in res.output  # integer: |PE(255)| / |token| = 255


def test_cli_plot_writes_the_file(tmp_path):
    out = tmp_path / "h.svg"
    res = runner.invoke(app, ["plot", "sinusoidal", "--kind", "heatmap", "-o", str(out), "--horizon", "32"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "<svg" in out.read_text()[:500] and "wrote" in res.output
    res = runner.invoke(app, ["plot", "sinusoidal", "--kind", "bias", "-o", str(tmp_path / "b.png")])
    assert res.exit_code == 3 and "skipped" in res.output
    res = runner.invoke(app, ["plot", "sinusoidal", "--kind", "nope", "-o", str(tmp_path / "b.png")])
    assert res.exit_code == 2 and "unknown kind" in res.output
    res = runner.invoke(app, ["plot", "all", "--kind", "magnitude", "-o", str(tmp_path / "m.png"), "--steps", "3"])
    assert res.exit_code == 2 and "--steps does not apply" in res.output


@pytest.mark.slow
def test_cli_report(tmp_path):
    out = tmp_path / "r.html"
    args = ["report", "-o", str(out), "--encodings", "binary,none", "--attention-steps", "0", "--no-pretrained"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output
    html = out.read_text()
    assert "<h3>binary " in html and "<h3>sinusoidal " not in html  # only the encodings asked for get a step
    res = runner.invoke(app, ["report", "-o", str(out), "--encodings", "nope"])
    assert res.exit_code == 2 and "unknown encoding" in res.output
    res = runner.invoke(app, ["report", "-o", str(out), "--study", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "results.jsonl" in res.output


def test_bound_of_toy_rope_matches_math(toys):
    pairs = analysis.rotation_pairs(analysis.build("toy-rope", dim=8, num_heads=1))
    assert [round(a, 6) for *_, a, _ in pairs] == [round(10000.0 ** (-i / 4), 6) for i in range(4)]
    assert math.isclose(pairs[0][2], 1.0, rel_tol=1e-6)


def test_bucket_ids_by_hand():
    # bias = -min(|m - n|, 1): distance 0 is one bucket, every other distance another.
    m = torch.arange(3)
    bias = -(m[:, None] - m[None, :]).abs().clamp(max=1).float()[None]  # [1, 3, 3]
    # Ids in order of first appearance by n - m: n - m = -2 (value -1) comes first.
    assert figures.bucket_ids(bias).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    bias[0, 0, 2] = float("-inf")  # a masked entry has no bucket
    assert figures.bucket_ids(bias)[0, 2] == -1


def test_attention_of_a_study_checkpoint(tmp_path):
    """`posenc plot RUN.pt --kind attention` draws a model trained by the study harness."""
    from posenc.experiments.config import config_from_dict
    from posenc.experiments.train import checkpoint_path, train_run

    cfg = config_from_dict(
        {
            "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 4, "eval_factors": [2]},
            "model": {"encoding": "sinusoidal", "dim": 16, "num_layers": 1, "num_heads": 2},
            "train": {"steps": 4, "batch_size": 4, "lr": 0.003, "warmup": 1, "checkpoint_every": 4, "threads": 1},
        }
    )
    record, _ = train_run(cfg, tmp_path)
    ckpt = checkpoint_path(tmp_path, record["run_id"])
    fig = pipeline_figures.plot(str(ckpt), "attention", length=5)
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(axes) == 2  # 1 layer x 2 heads
    # copy of length 5: BOS + 5 + SEP + 5 answer tokens, the last one only a target: 11 queries.
    assert axes[0].get_images()[0].get_array().shape == (11, 11)
    res = runner.invoke(app, ["plot", str(ckpt), "--kind", "attention", "-o", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pipeline_figures.plot(str(tmp_path / "missing.pt"), "attention")
