"""Per-dimension effect of every RoPE scaling rule: inv_freq_rule / inv_freq_default per
rotated pair, and the wavelength of each pair against the original context.

    PYTHONPATH=src python benchmarks/plot_rope_scaling.py [docs/img/rope_scaling.png]

Setting: head_dim 128, base 1e4, original context 4096, factor 8 (target 32768).
dynamic is shown at length 32768; longrope with illustrative factor lists (short all 1,
long rising from 1 to 8 with the pair index), shown past the original length;
proportional keeps the highest 75% of the frequencies.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import posenc

HEAD_DIM, BASE, ORIG, FACTOR = 128, 1e4, 4096, 8.0
N = HEAD_DIM // 2

RULES = {
    "linear (PI)": ({"rope_type": "linear", "factor": FACTOR}, None),
    "dynamic NTK @ 32768": ({"rope_type": "dynamic", "factor": FACTOR}, int(ORIG * FACTOR)),
    "yarn": ({"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIG}, None),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": FACTOR,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIG,
        },
        None,
    ),
    "longrope (long)": (
        {
            "rope_type": "longrope",
            "factor": FACTOR,
            "original_max_position_embeddings": ORIG,
            "short_factor": [1.0] * N,
            "long_factor": [1.0 + (FACTOR - 1.0) * i / (N - 1) for i in range(N)],
        },
        int(ORIG * FACTOR),
    ),
    "proportional p=0.75": ({"rope_type": "proportional", "partial_rotary_factor": 0.75}, None),
}


def main(out: str = "docs/img/rope_scaling.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default, _ = posenc.rope_frequencies(HEAD_DIM, {"rope_theta": BASE})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    pairs = list(range(N))
    ax2.plot(pairs, (2 * math.pi / default).tolist(), "k--", label="default")
    for label, (params, seq_len) in RULES.items():
        inv, af = posenc.rope_frequencies(
            HEAD_DIM, {**params, "rope_theta": BASE}, max_position_embeddings=ORIG, seq_len=seq_len
        )
        ratio = (inv / default).tolist()
        ax1.plot(pairs, ratio, label=f"{label} (attn factor {af:.3f})")
        wave = [2 * math.pi / f if f > 0 else float("nan") for f in inv.tolist()]
        ax2.plot(pairs, wave, label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("rotated pair i (high frequency -> low)")
    ax1.set_ylabel("inv_freq_rule / inv_freq_default")
    ax1.set_title(f"per-pair scaling, head_dim {HEAD_DIM}, base {BASE:.0e}, factor {FACTOR:g}")
    ax1.legend(fontsize=7)
    ax2.axhline(ORIG, color="grey", lw=0.8)
    ax2.text(1, ORIG * 1.2, f"original context {ORIG}", fontsize=7, color="grey")
    ax2.set_yscale("log")
    ax2.set_xlabel("rotated pair i")
    ax2.set_ylabel("wavelength 2*pi/inv_freq (tokens)")
    ax2.set_title("wavelength per pair (proportional: zero pairs not drawn)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
