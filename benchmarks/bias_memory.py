"""Peak memory and time of causal attention with a bias encoding on the flex backend.

For each encoding, in a fresh subprocess (so peak resident memory is its own):
q, k, v ``[1, h, s, d]`` float32, the causal block mask and the encoding's
``score_mod`` (the same functions ``Attention(backend="flex")`` calls), one compiled
warm-up call, then ``--reps`` timed calls under ``torch.no_grad()``. Peak resident
memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that subprocess (Python,
torch and the compiled kernel included; Inductor's compile workers are other
processes). The baseline ``sdpa-nobias`` is ``scaled_dot_product_attention(is_causal=True)``
without any bias, measured the same way in its own subprocess; every time ratio is
against it, from the same run. ``flex-nobias`` (the flex kernel with the causal block
mask and no score_mod) separates the kernel's own cost from the bias's.

The materialized bias an SDPA backend would need is ``h * s * s * 4`` bytes
(8 GiB at h = 8, s = 16384), before the mask or the softmax.

    PYTHONPATH=src python benchmarks/bias_memory.py                # s = 16384, h = 8, d = 64
    PYTHONPATH=src python benchmarks/bias_memory.py --seq 2048     # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

ENCODINGS = ["alibi", "t5", "kerple", "fire"]


def _child(name: str, seq: int, heads: int, head_dim: int, reps: int, threads: int) -> dict:
    import torch

    import posenc
    from posenc import flex

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, head_dim) for _ in range(3))  # [b, h, s, d]
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    positions = torch.arange(seq)
    with torch.no_grad():
        if name == "sdpa-nobias":

            def run():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pe = None if name == "flex-nobias" else posenc.create(name, num_heads=heads).eval()
            mask = flex.block_mask(
                1, seq, seq, n_keys=seq, causal=True, padding=None, segment_ids=None, device=q.device
            )

            def run():
                score_mod = None if pe is None else pe.score_mod(positions, positions)
                return flex.flex_attend(q, k, v, score_mod, mask, gqa=False)

        t0 = time.perf_counter()
        out = run()  # compiles (flex) / warms up (sdpa)
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
    assert out.shape == (1, heads, seq, head_dim) and bool(torch.isfinite(out).all())
    return {
        "name": name,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_after_inputs_kib": rss_inputs,
        "first_call_s": first,
        "median_s": statistics.median(times),
        "times_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encodings", nargs="+", default=ENCODINGS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.seq, args.heads, args.head_dim, args.reps, args.threads)))
        return

    import torch

    gib = 2**30
    bias_bytes = args.heads * args.seq * args.seq * 4
    print(
        f"causal attention, b=1, h={args.heads}, s={args.seq}, d={args.head_dim}, float32, "
        f"torch {torch.__version__}, {args.threads} threads, {args.reps} timed reps (median)"
    )
    print(f"materialized bias [h, s, s] float32 would need {bias_bytes / gib:.2f} GiB")
    rows = []
    for name in ["sdpa-nobias", "flex-nobias", *args.encodings]:
        cmd = [sys.executable, __file__, "--child", name]
        cmd += ["--seq", str(args.seq), "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
        cmd += ["--reps", str(args.reps), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{name}: FAILED\n{res.stderr[-2000:]}")
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"  measured {name}: median {r['median_s']:.3f} s, peak RSS {r['peak_rss_kib'] / 2**20:.3f} GiB", flush=True
        )
    base = next((r for r in rows if r["name"] == "sdpa-nobias"), None)
    print()
    header = f"{'backend/encoding':<22}{'peak RSS GiB':>13}{'RSS after q,k,v GiB':>21}{'bias would need GiB':>21}"
    header += f"{'median s':>10}{'first call s':>14}{'time / sdpa-nobias':>20}"
    print(header)
    for r in rows:
        plain = r["name"].endswith("-nobias")
        need = 0.0 if plain else bias_bytes / gib
        label = r["name"] if plain else f"flex/{r['name']}"
        ratio = r["median_s"] / base["median_s"] if base else float("nan")
        print(
            f"{label:<22}{r['peak_rss_kib'] / 2**20:>13.3f}{r['rss_after_inputs_kib'] / 2**20:>21.3f}"
            f"{need:>21.2f}{r['median_s']:>10.3f}{r['first_call_s']:>14.2f}{ratio:>20.2f}"
        )


if __name__ == "__main__":
    main()
