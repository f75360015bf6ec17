"""RoPE on a CUDA GPU: the Triton kernel checked against the reference, then timed.

For each case (DESIGN.md shapes), in one run on the same tensors:

* check: posenc's Triton kernel (``apply_rotary(..., compiled="triton")``), out of place
  and in place, both layouts, against the float64 formula (max |difference| printed,
  error above 1e-5 float32 / 1e-2 bfloat16 fails the run);
* time (CUDA events, median of ``--reps`` after warm-up): ``copy_`` of q and k into
  preallocated tensors (the memory limit), the Triton kernel out of place and in place,
  posenc's torch.compile path (``compiled=True``), and transformers' Llama
  ``apply_rotary_pos_emb`` when transformers is installed. Prints ``t_copy / t_impl``
  and ``peer / posenc``.

Run on a machine with a GPU (exits 2 with the reason elsewhere):

    python benchmarks/rope_gpu.py            # ~1 minute on one GPU
    pytest -q tests/test_rope_triton.py      # the same kernel, compiled, in the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from posenc.functional import rope_triton
from posenc.functional.rope import rope_cos_sin
from posenc.functional.rope_fast import apply_rotary, rotate_formula

CASES = [(1, 32, 8, 2048, 128), (1, 32, 32, 8192, 128), (1, 32, 8, 2048, 64), (1, 32, 8, 2048, 256), (1, 32, 8, 1, 128)]


def _time(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event timings after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def _hf():
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except Exception as err:  # noqa: BLE001 - a missing optional peer is reported, not fatal
        print(f"note: transformers not usable ({type(err).__name__}: {err}); its row is left out")
        return None
    return apply_rotary_pos_emb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark checks and times the Triton kernel on one", file=sys.stderr)
        return 2
    if not rope_triton.installed():
        print("triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, median of {args.reps} after {args.warmup}")
    hf = _hf()
    failed = False
    print("case | check max|diff| | t_copy/t_triton | t_copy/t_triton inplace | compiled/triton | transformers/triton")
    for dtype in [getattr(torch, n) for n in args.dtypes.split(",")]:
        for b, h, h_kv, s, d in CASES:
            q = torch.randn(b, h, s, d, device="cuda", dtype=dtype)
            k = torch.randn(b, h_kv, s, d, device="cuda", dtype=dtype)
            inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            cos, sin = rope_cos_sin(torch.arange(s, device="cuda") + 100_000, inv_freq.cuda(), dtype=torch.float64)
            worst = 0.0
            for layout in ("half", "interleaved"):
                want_q = rotate_formula(q.double(), cos, sin, layout, d)
                got_q, _ = apply_rotary(q, k, cos.float(), sin.float(), layout=layout, compiled="triton")
                worst = max(worst, (got_q.double() - want_q).abs().max().item())
                q2, k2 = q.clone(), k.clone()
                apply_rotary(q2, k2, cos.float(), sin.float(), layout=layout, inplace=True, compiled="triton")
                worst = max(worst, (q2.double() - want_q).abs().max().item())
            limit = 1e-5 if dtype == torch.float32 else 1e-2
            failed |= worst > limit
            c32, s32 = cos.float(), sin.float()
            oq, ok = torch.empty_like(q), torch.empty_like(k)
            t_copy = _time(lambda: (oq.copy_(q), ok.copy_(k)), args.reps, args.warmup)  # noqa: B023
            t_tri = _time(lambda: apply_rotary(q, k, c32, s32, compiled="triton"), args.reps, args.warmup)  # noqa: B023
            t_inp = _time(
                lambda: apply_rotary(oq, ok, c32, s32, inplace=True, compiled="triton"),  # noqa: B023
                args.reps,
                args.warmup,
            )
            t_cmp = _time(lambda: apply_rotary(q, k, c32, s32, compiled=True), args.reps, args.warmup)  # noqa: B023
            hf_ratio = "-"
            if hf is not None:
                cw, sw = torch.cat([c32, c32], -1).to(dtype)[None], torch.cat([s32, s32], -1).to(dtype)[None]
                t_hf = _time(lambda: hf(q, k, cw, sw), args.reps, args.warmup)  # noqa: B023
                hf_ratio = f"{t_hf / t_tri:.2f}x"
            flag = " FAIL" if worst > limit else ""
            print(
                f"{(b, h, h_kv, s, d)} {str(dtype).removeprefix('torch.')} | {worst:.2e}{flag}"
                f" | {t_copy / t_tri:.2f} | {t_copy / t_inp:.2f} | {t_cmp / t_tri:.2f}x | {hf_ratio}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
