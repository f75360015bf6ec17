"""Training throughput: posenc's Transformer against x-transformers, same size and encoding.

For each encoding that both libraries have, one training step (forward, cross-entropy,
backward, AdamW step) of a decoder LM of the same width, depth, heads, MLP ratio,
vocabulary, tied embeddings, RMSNorm and batch, both eager, float32. Steps alternate
between the two models (round-robin) so that load changes hit both alike; tokens/s =
batch * seq / median step time after warm-up (posenc's rotary path compiles its hot
shape during warm-up).

Encoding pairs (posenc name <-> x-transformers flags):

    learned     <-> use_abs_pos_emb=True (learned absolute table)
    sinusoidal  <-> scaled_sinu_pos_emb=True (sinusoidal; x-transformers adds a learned scale)
    rope        <-> rotary_pos_emb=True, rotary_emb_dim=head_dim (full rotary, as posenc)
    alibi       <-> alibi_pos_bias=True           (when posenc has "alibi")
    t5          <-> rel_pos_bias=True             (when posenc has "t5"; x-transformers
                                                   refuses its SDPA "flash" path with it)

    PYTHONPATH=src python benchmarks/train_throughput.py           # full run
    PYTHONPATH=src python benchmarks/train_throughput.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import posenc
from posenc import Transformer, TransformerConfig

PAIRS = {
    "learned": {"use_abs_pos_emb": True},
    "sinusoidal": {"use_abs_pos_emb": True, "scaled_sinu_pos_emb": True},
    "rope": {"use_abs_pos_emb": False, "attn": {"rotary_pos_emb": True}},
    "alibi": {"use_abs_pos_emb": False, "attn": {"alibi_pos_bias": True}},
    "t5": {"use_abs_pos_emb": False, "attn": {"rel_pos_bias": True}},
}


def build_posenc(name: str, vocab: int, dim: int, depth: int, heads: int, seq: int) -> torch.nn.Module:
    cfg = TransformerConfig(
        vocab_size=vocab, dim=dim, num_layers=depth, num_heads=heads, mlp_ratio=4.0, encoding=name, max_len=seq
    )
    return Transformer(cfg)


def build_xt(name: str, vocab: int, dim: int, depth: int, heads: int, seq: int) -> torch.nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    flags = dict(PAIRS[name])
    attn = flags.pop("attn", {})
    if attn.get("rotary_pos_emb"):
        attn["rotary_emb_dim"] = dim // heads  # x-transformers' default rotates only half the head
    return TransformerWrapper(
        num_tokens=vocab,
        max_seq_len=seq,
        tie_embedding=True,
        attn_layers=Decoder(
            dim=dim,
            depth=depth,
            heads=heads,
            attn_dim_head=dim // heads,
            ff_mult=4,
            use_rmsnorm=True,
            attn_flash=not attn.get("rel_pos_bias", False),  # x-transformers: no flash with T5 bias
            **attn,
        ),
        **flags,
    )


def make_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        logits = model(tokens)  # [b, s, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps (smoke run)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--encodings", default=",".join(PAIRS))
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.quick:
        args.dim, args.depth, args.heads, args.seq, args.batch, args.steps, args.warmup = 64, 2, 4, 64, 4, 3, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, cpu_count {os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()}, load average {load:.2f} at start"
    )
    print(
        f"dim {args.dim}, depth {args.depth}, heads {args.heads}, seq {args.seq}, batch {args.batch}, "
        f"vocab {args.vocab}, float32, AdamW; median of {args.steps} steps after {args.warmup} warm-up steps; "
        f"command: python {' '.join(sys.argv)}\n"
    )
    have = set(posenc.available())
    wanted = [e for e in args.encodings.split(",") if e]
    missing = [e for e in wanted if e not in have]
    rows = []
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    targets = torch.roll(tokens, -1, dims=1)
    for name in wanted:
        if name in missing:
            continue
        size = (args.vocab, args.dim, args.depth, args.heads, args.seq)
        models = {"posenc": build_posenc(name, *size), "x-transformers": build_xt(name, *size)}
        steps = {k: make_step(m.train(), tokens, targets) for k, m in models.items()}
        for fn in steps.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in steps}
        gc.collect()
        order = list(steps.items())
        for i in range(args.steps):
            # Alternate which model goes first: the first after a switch was measured slower.
            for k, fn in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        rows.append((name, med, params))
        tok = args.batch * args.seq
        print(
            f"{name:11s} posenc {tok / med['posenc']:9.0f} tok/s   x-transformers {tok / med['x-transformers']:9.0f} "
            f"tok/s   ratio {med['x-transformers'] / med['posenc']:.2f}×",
            flush=True,
        )
    tok = args.batch * args.seq
    print("\n| encoding | posenc tok/s | x-transformers tok/s | posenc / x-transformers | params posenc | params x-t |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, med, params in rows:
        print(
            f"| {name} | {tok / med['posenc']:.0f} | {tok / med['x-transformers']:.0f} | "
            f"{med['x-transformers'] / med['posenc']:.2f}× | {params['posenc']:,} | {params['x-transformers']:,} |"
        )
    if missing:
        print(f"\nnot compared (not registered in posenc on this branch): {', '.join(missing)}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
