"""examples/own_attention.py (the README's "your own model" quickstart) runs, and its
attention built on the three hooks equals posenc's own Attention with the same weights."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import posenc

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "own_attention.py"


def _example():
    spec = importlib.util.spec_from_file_location("own_attention", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_runs(capsys):
    _example().main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["sinusoidal", "rope", "alibi", "t5"]


@pytest.mark.parametrize("name", ["rope", "alibi", "t5", "xpos", "kerple"])
def test_own_attention_equals_posenc_attention(name):
    example = _example()
    torch.manual_seed(0)
    pe = posenc.registry.create_example(name, dim=32, num_heads=4, head_dim=8, max_len=64)
    with torch.no_grad():
        for param in pe.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ours = posenc.Attention(32, 4, pe=pe).eval()
    mine = example.MyAttention(32, 4, pe).eval()
    with torch.no_grad():
        mine.qkv.weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mine.out.weight.copy_(ours.out_proj.weight)
        x = torch.randn(2, 10, 32)
        torch.testing.assert_close(mine(x), ours(x), rtol=1e-5, atol=1e-5)


def test_the_readme_run_config_loads(tmp_path):
    import re

    from posenc.experiments.config import load_config

    readme = EXAMPLE.parents[1].joinpath("README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    path = tmp_path / "run.yaml"
    path.write_text(block, encoding="utf-8")
    config = load_config(path)
    assert (config.task.name, config.model.encoding, config.train.steps) == ("copy", "rope", 4000)
    path.write_text("{}\n", encoding="utf-8")
    assert load_config(path).task.name  # every key optional
