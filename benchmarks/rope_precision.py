"""RoPE angle precision at long positions: posenc's exact cos/sin vs the usual float32
``position * inv_freq``, both against a float64 reference (and an mpmath spot check).

    PYTHONPATH=src python benchmarks/rope_precision.py

Columns (max |error| of cos and sin over the positions of each band, head_dim 128):

* ``posenc f32 cache``: ``pe.cos_sin(positions)`` (float32, what float32/bf16/fp16
  activations read) vs ``cos(p * inv_freq)`` in float64 with posenc's float64 inv_freq.
* ``usual f32``: ``cos(positions.float() * inv_freq_f32)`` in float32, as transformers'
  rotary embeddings compute it, vs float64 cos of the *same* float32 inv_freq (so only
  the rounding of the angle counts).
* ``usual vs f64 freq``: the same float32 values vs the float64-frequency reference (adds
  the float32 rounding of inv_freq itself, what a float64-trained reference would see).
* ``posenc bf16``: the cache cast to bfloat16, vs the reference: bfloat16 rounding
  (2**-9 relative) is all that is left; the float32 cache itself is exact.
"""

from __future__ import annotations

import torch

import posenc

BANDS = [(0, 2**10), (2**10, 2**14), (2**14, 2**16), (2**16, 2**18), (2**18, 2**20 + 1)]
SAMPLES = 4096


def band_positions(lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    return torch.cat([torch.randint(lo, hi, (SAMPLES,), generator=g), torch.tensor([hi - 1])])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def mpmath_check(pe, positions: torch.Tensor) -> float:
    """Max |posenc cos - cos| with cos evaluated by mpmath at 40 digits of the exact
    product position * inv_freq (inv_freq taken as its exact float64 value)."""
    import mpmath

    mpmath.mp.dps = 40
    cos, _ = pe.cos_sin(positions)
    worst = 0.0
    for i, p in enumerate(positions.tolist()):
        for j in range(0, pe.inv_freq.numel(), 7):
            exact = mpmath.cos(mpmath.mpf(p) * mpmath.mpf(float(pe.inv_freq[j])))
            worst = max(worst, abs(float(cos[i, j]) - float(exact)))
    return worst


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("max |error| of cos/sin, head_dim 128, vs a float64 reference\n")
    print("| base | positions | posenc f32 cache | usual f32 | usual vs f64 freq | posenc bf16 |")
    print("|---|---|---|---|---|---|")
    for base in (1e4, 5e5):
        pe = posenc.create("rope", head_dim=128, base=base)
        inv64 = pe.inv_freq
        inv32 = inv64.float()
        for lo, hi in BANDS:
            pos = band_positions(lo, hi, g)
            ref64 = pos.double()[:, None] * inv64  # [n, 64] float64 angles
            ref_same = pos.double()[:, None] * inv32.double()
            cos, sin = pe.cos_sin(pos)
            ours = max(max_err(cos, torch.cos(ref64)), max_err(sin, torch.sin(ref64)))
            ang32 = pos.float()[:, None] * inv32  # the usual float32 product
            usual = max(max_err(torch.cos(ang32), torch.cos(ref_same)), max_err(torch.sin(ang32), torch.sin(ref_same)))
            usual64 = max(max_err(torch.cos(ang32), torch.cos(ref64)), max_err(torch.sin(ang32), torch.sin(ref64)))
            bf16 = max(max_err(cos.bfloat16(), torch.cos(ref64)), max_err(sin.bfloat16(), torch.sin(ref64)))
            print(f"| {base:.0e} | [{lo}, {hi - 1}] | {ours:.1e} | {usual:.1e} | {usual64:.1e} | {bf16:.1e} |")
    pe = posenc.create("rope", head_dim=128, base=5e5)
    spot = torch.tensor([0, 1, 12345, 2**19 + 7, 999_999, 2**20])
    worst = mpmath_check(pe, spot)
    print(f"\nmpmath (40 digits) spot check, base 5e5, positions {spot.tolist()}: max |error| {worst:.1e}")


if __name__ == "__main__":
    main()
