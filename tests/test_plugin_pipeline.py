"""A plugin reaches every command, worker processes included, and gets a leaderboard
without retraining the baselines (``posenc compare``); the DAPE example plugin passes
the contract and is ranked on the smoke preset. Each command runs in a fresh interpreter
(``python -m posenc.cli``): the registry reads the plugins once per process. Baselines:
``posenc study --preset smoke`` of sinusoidal and none, trained once for this module."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

DAPE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "dape_plugin.py"
PLUGIN = textwrap.dedent(
    '''
    import dataclasses
    from typing import ClassVar

    import posenc


    @dataclasses.dataclass(frozen=True)
    class ThirdParams(posenc.Params):
        dim: int

        def validate(self):
            if not isinstance(self.dim, int) or self.dim < 1:
                raise ValueError(f"dim must be a positive int, got {self.dim!r}")


    @posenc.register
    class Third(posenc.AdditiveEncoding):
        """Every position p adds p / 3 to each dimension (a test plugin)."""

        name = "NAME"
        family = "additive"
        reference = "a plugin in a temporary folder"
        formula = "PE(p, i) = p / 3"
        Params: ClassVar[type[posenc.Params]] = ThirdParams

        def table(self, positions):
            return (positions.double()[..., None] / 3).expand(*positions.shape, self.params.dim).float()
    '''
)
CONFIG = """
task: {name: copy, train_length: 3, num_symbols: 4, eval_samples: 8}
model: {encoding: NAME, dim: 16, num_layers: 1, num_heads: 2}
train: {steps: 5, batch_size: 8, warmup: 1, threads: 1}
"""


def posenc_cli(*args, cwd, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("POSENC_PLUGINS", "PYTHONPATH")}
    full_env.update(COLUMNS="200", **env)
    done = subprocess.run(
        [sys.executable, "-m", "posenc.cli", *map(str, args)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    return done


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("baselines")
    ok(
        posenc_cli(
            "study",
            "--preset",
            "smoke",
            "--encodings",
            "sinusoidal,none",
            "--out",
            folder / "base",
            "--no-report",
            "--jobs",
            "1",
            "--threads",
            "1",
            cwd=folder,
        )
    )
    return folder / "base" / "results.jsonl"


def every_command(name: str, folder: pathlib.Path, baselines: pathlib.Path, **env: str) -> None:
    """list, show, check, analyze, plot, train, study --jobs 2 and compare with ``name``."""
    assert name in ok(posenc_cli("list", cwd=folder, **env))
    assert "a plugin in a temporary folder" in ok(posenc_cli("show", name, cwd=folder, **env))
    assert "all 7 checks passed" in ok(posenc_cli("check", name, cwd=folder, **env))
    card = ok(posenc_cli("analyze", name, "--horizon", "32", "--train-length", "16", cwd=folder, **env))
    assert name in card and "additive" in card
    ok(posenc_cli("plot", name, "-k", "heatmap", "-o", folder / "heatmap.png", "--horizon", "32", cwd=folder, **env))
    assert (folder / "heatmap.png").stat().st_size > 0
    (folder / "run.yaml").write_text(CONFIG.replace("NAME", name))
    ok(posenc_cli("train", "--config", folder / "run.yaml", "--out", folder / "train", cwd=folder, **env))
    assert [r["encoding"] for r in records(folder / "train" / "results.jsonl")] == [name]
    study = folder / "study"
    ok(
        posenc_cli(
            "study",
            "--preset",
            "smoke",
            "--encodings",
            name,
            "--seeds",
            "0,1",
            "--jobs",
            "2",
            "--threads",
            "1",
            "--no-report",
            "--out",
            study,
            cwd=folder,
            **env,
        )
    )
    assert sorted(r["seed"] for r in records(study / "results.jsonl")) == [0, 1]
    out = folder / "compare"
    shown = ok(
        posenc_cli(
            "compare",
            name,
            "--preset",
            "smoke",
            "--baselines",
            baselines,
            "--out",
            out,
            "--jobs",
            "1",
            "--threads",
            "1",
            "--no-report",
            cwd=folder,
            **env,
        )
    )
    assert f"{name} against the baselines" in shown and "of 3" in shown and "mean rank" in shown
    assert [r["encoding"] for r in records(out / "results.jsonl")] == [name]  # only its runs were trained
    merged = records(out / "leaderboard" / "results.jsonl")
    assert sorted(r["encoding"] for r in merged) == sorted(["sinusoidal", "none", name])
    text = (out / "compare.md").read_text()
    assert "| copy | exact match 1..3 |" in text and "mean rank by token_accuracy" in text
    assert (out / "leaderboard" / "results.md").is_file() and list((out / "leaderboard" / "plots").glob("*.png"))


def test_a_plugin_from_posenc_plugins_reaches_every_command(tmp_path, baselines):
    (tmp_path / "third.py").write_text(PLUGIN.replace("NAME", "third"))
    every_command("third", tmp_path, baselines, POSENC_PLUGINS=str(tmp_path / "third.py"))


def test_an_installed_plugin_reaches_every_command(tmp_path, baselines):
    site = tmp_path / "site"
    site.mkdir()
    (site / "posenc_third.py").write_text(PLUGIN.replace("NAME", "third-installed"))
    info = site / "posenc_third-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: posenc-third\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[posenc.encodings]\nthird = posenc_third\n")
    every_command("third-installed", tmp_path, baselines, PYTHONPATH=str(site))


def test_a_plugin_option_reaches_the_study_and_compare_workers(tmp_path, baselines):
    """``--plugin`` is not in the environment: the spawned workers get it from the parent."""
    plugin = tmp_path / "third.py"
    plugin.write_text(PLUGIN.replace("NAME", "third-option"))
    study = tmp_path / "study"
    ok(
        posenc_cli(
            "--plugin",
            plugin,
            "study",
            "--preset",
            "smoke",
            "--encodings",
            "third-option",
            "--seeds",
            "0,1",
            "--jobs",
            "2",
            "--threads",
            "1",
            "--no-report",
            "--out",
            study,
            cwd=tmp_path,
        )
    )
    assert sorted(r["seed"] for r in records(study / "results.jsonl")) == [0, 1]
    out = tmp_path / "compare"
    ok(
        posenc_cli(
            "--plugin",
            plugin,
            "compare",
            "third-option",
            "--preset",
            "smoke",
            "--baselines",
            baselines,
            "--out",
            out,
            "--jobs",
            "2",
            "--threads",
            "1",
            "--no-report",
            cwd=tmp_path,
        )
    )
    assert [r["encoding"] for r in records(out / "results.jsonl")] == ["third-option"]


def test_compare_refuses_baselines_of_another_config(tmp_path, baselines):
    ok(
        posenc_cli(
            "study",
            "--preset",
            "smoke",
            "--encodings",
            "none",
            "--steps",
            "10",
            "--out",
            tmp_path / "short",
            "--no-report",
            "--jobs",
            "1",
            "--threads",
            "1",
            cwd=tmp_path,
        )
    )
    done = posenc_cli(
        "compare",
        "alibi",
        "--preset",
        "smoke",
        "--baselines",
        tmp_path / "short" / "results.jsonl",
        "--out",
        tmp_path / "compare",
        "--no-report",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert "differing keys: train.steps" in done.stdout and "not be fair" in done.stdout
    assert not (tmp_path / "compare" / "results.jsonl").exists()  # nothing trained


def test_the_dape_example_passes_the_contract_and_gets_a_smoke_leaderboard(tmp_path, baselines):
    env = {"POSENC_PLUGINS": str(DAPE)}
    assert "all 7 checks passed" in ok(posenc_cli("check", "dape", cwd=tmp_path, **env))
    out = tmp_path / "compare-dape"
    shown = ok(
        posenc_cli(
            "compare",
            "dape",
            "--preset",
            "smoke",
            "--baselines",
            baselines,
            "--out",
            out,
            "--jobs",
            "1",
            "--threads",
            "1",
            "--no-report",
            cwd=tmp_path,
            **env,
        )
    )
    assert "dape against the baselines" in shown and "token accuracy (3, 6]" in shown
    assert [r["encoding"] for r in records(out / "results.jsonl")] == ["dape"]
    assert "| dape |" in (out / "compare.md").read_text()


def test_dape_reads_the_content_and_mixes_heads_per_entry(tmp_path):
    """The bias depends on q (content), entry (i, j) only on q_i, k_j and the positions,
    and the ALiBi variant works with grouped-query keys."""
    code = textwrap.dedent(
        """
        import torch, posenc
        torch.manual_seed(0)
        pe = posenc.create("dape", num_heads=4)
        q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
        pos = torch.arange(5)
        with torch.no_grad():
            b = pe.bias(pos, pos, q=q, k=k)
            b2 = pe.bias(pos, pos, q=2 * q, k=k)
            q3 = q.clone(); q3[:, :, 4] += 1.0  # change the last query only
            b3 = pe.bias(pos, pos, q=q3, k=k)
            alibi = posenc.create("dape", num_heads=4, static="alibi").bias(pos, pos, q=q, k=k[:, :2])
        print(tuple(b.shape), bool((b - b2).abs().max() > 1e-4), bool(torch.equal(b[:, :, :4], b3[:, :, :4])),
              tuple(alibi.shape))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "POSENC_PLUGINS"}
    env["POSENC_PLUGINS"] = str(DAPE)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["(2,", "4,", "5,", "5)", "True", "True", "(2,", "4,", "5,", "5)"], done.stderr
