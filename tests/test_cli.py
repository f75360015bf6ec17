"""The command line: list, show, check, evaluate and plugins."""

import pytest
from typer.testing import CliRunner

import posenc
from posenc.cli import app

runner = CliRunner()


def test_list_shows_every_registered_encoding():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in posenc.available():
        assert name in result.output


def test_show_prints_formula_reference_and_parameters():
    result = runner.invoke(app, ["show", "sinusoidal"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Vaswani et al. 2017" in result.output
    assert "sin(pos / base^(2i/dim))" in result.output
    assert "10000.0" in result.output and "(required)" in result.output


def test_show_unknown_name_is_a_one_line_error_with_a_suggestion():
    result = runner.invoke(app, ["show", "sinusodial"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "Did you mean 'sinusoidal'" in result.output
    assert "Traceback" not in result.output


def words(text: str) -> str:
    """``text`` with every run of whitespace as one space: rich wraps at the console's
    width, which the environment may fix before a test runs (pytest-xdist's workers
    start with ``COLUMNS=80``)."""
    return " ".join(text.split())


def test_show_prints_formula_brackets_literally():
    """Formulas hold brackets that rich would read as markup and drop."""
    for name in ("t5", "shaw", "learned", "rope2d"):
        result = runner.invoke(app, ["show", name], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert words(f"formula: {posenc.get(name).formula}") in words(result.output)


def test_evaluate_a_synthetic_checkpoint_prints_its_table(tmp_path):
    """The README's `posenc evaluate runs/.../checkpoints/<run>.pt` on a copy run."""
    config = tmp_path / "copy.yaml"
    config.write_text(
        "task: {name: copy, train_length: 3, num_symbols: 4, eval_samples: 8, eval_factors: [1, 2]}\n"
        "model: {encoding: rope, dim: 16, num_layers: 1, num_heads: 2}\n"
        "train: {steps: 3, batch_size: 4, warmup: 1}\n",
        encoding="utf-8",
    )
    trained = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("*.pt")
    result = runner.invoke(app, ["evaluate", str(checkpoint), "--factors", "1,2,4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "copy: exact match by length" in result.output and "rope" in result.output


def test_check_prints_the_contract_table_and_exits_by_its_result():
    ok = runner.invoke(app, ["check", "rope"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "all 7 checks passed" in ok.output
    fixed = runner.invoke(app, ["check", "normalized", "--checks", "causality,hooks"], env={"COLUMNS": "200"})
    assert fixed.exit_code == 0, fixed.output  # causal with its example length: pos / (N - 1)
    assert "all 2 checks passed" in fixed.output
    bad = runner.invoke(app, ["check", "rope", "--checks", "causalty"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "unknown checks ['causalty']" in bad.output


def _posenc(*args: str, **env: str):
    """The CLI in a fresh interpreter: plugins register once per process."""
    import os
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if k != "POSENC_PLUGINS"}
    full_env.update(COLUMNS="200", **env)
    return subprocess.run(
        [sys.executable, "-m", "posenc.cli", *args], env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_plugin_option_and_variable_reach_every_command(tmp_path):
    from test_plugins import PLUGIN  # the same test plugin as the registry's tests

    plugin = tmp_path / "tenth.py"
    plugin.write_text(PLUGIN.replace("NAME", "tenth").replace("a test plugin", "a test plugin [with brackets]"))
    listed = _posenc("--plugin", str(plugin), "list")
    assert listed.returncode == 0 and "tenth" in listed.stdout, listed.stderr
    shown = _posenc("show", "tenth", POSENC_PLUGINS=str(plugin))
    assert shown.returncode == 0 and "a test plugin [with brackets]" in shown.stdout, shown.stderr
    checked = _posenc("--plugin", str(plugin), "check", "tenth")
    assert checked.returncode == 0 and "all 7 checks passed" in checked.stdout, checked.stdout + checked.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("import posenc\nraise ImportError('needs a package that is not installed')\n", encoding="utf-8")
    failed = _posenc("--plugin", str(broken), "list")
    assert failed.returncode == 2 and "Traceback" not in failed.stdout + failed.stderr
    assert "plugin" in failed.stdout and "broken.py" in failed.stdout and "needs a package" in failed.stdout


def test_bad_lists_and_a_config_given_as_checkpoint_are_clear_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: {name: copy}\n", encoding="utf-8")
    cases = [
        (["evaluate", str(config)], "is a run config, not a checkpoint: train it with `posenc train --config"),
        (["study", "--seeds", "a", "--out", str(tmp_path / "s")], "--seeds must be comma-separated integers, got 'a'"),
        (["extend", "--factors", "1,x", "--out", str(tmp_path / "e")], "--factors must be comma-separated integers"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 2, result.output
        assert message in result.output and "invalid literal" not in result.output and "delete" not in result.output


def test_typos_get_a_suggestion_and_yaml_errors_a_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task: {name: copy\nmodel: [\n", encoding="utf-8")
    typo = tmp_path / "typo.yaml"
    typo.write_text("task: {name: copyy}\n", encoding="utf-8")
    cases = [
        (["train", "--config", str(bad_yaml)], "is not valid YAML at line 2, column 6"),
        (["train", "--config", str(typo)], "unknown task 'copyy'"),
        (["study", "--tasks", "revers", "--out", str(tmp_path / "s")], "Did you mean 'reverse'?"),
        (["plot", "sinusoidal", "-k", "heatmapp", "-o", str(tmp_path / "x.png")], "Did you mean 'heatmap'?"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
    typo_result = runner.invoke(app, ["train", "--config", str(typo)], env={"COLUMNS": "300"})
    assert "Did you mean 'copy'?" in typo_result.output


def test_a_figure_of_another_family_names_the_kinds_that_apply(tmp_path):
    result = runner.invoke(
        app, ["plot", "sinusoidal", "-k", "buckets", "-o", str(tmp_path / "x.png")], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 3, result.output
    assert "Kinds that apply to 'sinusoidal': heatmap, similarity" in words(result.output)
    rope = runner.invoke(app, ["plot", "alibi", "-k", "decay", "-o", str(tmp_path / "x.png")], env={"COLUMNS": "300"})
    assert "Kinds that apply to 'alibi': heatmap, bias" in words(rope.output)  # no buckets: ALiBi never saturates


@pytest.mark.parametrize("columns", [80, 240])
def test_analyze_fits_the_terminal_and_explains_its_columns(columns):
    result = runner.invoke(app, ["analyze", "rope", "alibi", "sinusoidal", "binary"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= columns
    table_lines = [line for line in lines if line.startswith(("│", "┃"))]
    for name in ("rope", "alibi", "sinusoidal", "binary", "rotation", "new ("):
        assert any(name in line for line in table_lines), name  # whole cells, never wrapped letter by letter
    assert "rel. dev.: how far scores of fixed content depend on anything but m - n" in " ".join(lines)


BROKEN_PLUGINS = """
import dataclasses
from typing import ClassVar

import torch

import posenc


@dataclasses.dataclass(frozen=True)
class DimParams(posenc.Params):
    dim: int

    def validate(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")


@posenc.register
class LeaksFuture(posenc.PositionalEncoding):
    name = "leaks-future"
    Params: ClassVar[type[posenc.Params]] = DimParams

    def embed(self, x, positions):
        return x + x.mean(dim=1, keepdim=True)  # every token sees the later ones


@posenc.register
class WrongShape(posenc.PositionalEncoding):
    name = "wrong-shape"
    Params: ClassVar[type[posenc.Params]] = DimParams

    def embed(self, x, positions):
        return x[:, :, : x.shape[-1] // 2]  # drops half the width


@posenc.register
class ChunkRelative(posenc.PositionalEncoding):
    name = "chunk-relative"
    Params: ClassVar[type[posenc.Params]] = DimParams

    def embed(self, x, positions):
        chunk = torch.arange(x.shape[1], dtype=x.dtype)[:, None]  # restarts at 0 on every cached call
        return x + torch.sin(chunk / (1 + torch.arange(x.shape[-1], dtype=x.dtype)))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,check,detail",
    [
        ("leaks-future", "causality", "appending 4 tokens to 8 changed the logits"),
        ("wrong-shape", "hooks", "embed: x (2, 5, 32)"),
        ("chunk-relative", "kv_cache", "decoding token 3 with the cache differs"),
    ],
)
def test_check_catches_broken_plugins(tmp_path, name, check, detail):
    """Three broken plugins, each caught by `posenc check` with its failing example."""
    plugin = tmp_path / "broken_plugins.py"
    plugin.write_text(BROKEN_PLUGINS, encoding="utf-8")
    done = _posenc("--plugin", str(plugin), "check", name)
    assert done.returncode == 1, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert detail in out and check in [c.strip() for c in out.split("checks failed:")[1].split(",")], out


def test_help_reflows_the_docstring_paragraphs_and_keeps_placeholders():
    """The help renders docstrings as markdown: a paragraph's line breaks are the
    terminal's, not the source's, and `<folder>`-style placeholders stay visible."""
    import re

    out = runner.invoke(app, ["diagnose", "--help"], env={"COLUMNS": "200"}).output
    text = re.sub(r"[ │]+", " ", out)
    assert "restricted to its last W keys, W the longest training sequence" in text  # a source line break
    assert "<folder>/probes.jsonl" in text
    assert "<out>/base" in runner.invoke(app, ["extend", "--help"], env={"COLUMNS": "200"}).output
