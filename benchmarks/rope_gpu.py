"""RoPE on a CUDA GPU: the Triton kernel checked against the reference, then timed.

For each case of ``CASES`` (``(b, h_q, h_kv, s, d)``: a prefill with grouped key heads at
head sizes 64, 128 and 256, a longer one without grouping, a one-token decode), in one run
on the same tensors:

* check: posenc's Triton kernel (``apply_rotary(..., compiled="triton")``), out of place
  and in place, both layouts, against the float64 formula. The kernel computes in
  float32 and rounds once, so the printed error is what exceeds that rounding: max
  ``|got - want| - u·|want|`` with ``u`` half the dtype's unit in the last place
  (2^-24 float32, 2^-8 bfloat16); above 1e-5 fails the run.
* time (CUDA events, median of ``--reps`` after warm-up), twice: each call launched from
  Python (what eager code pays, launch overhead included) and replayed from a CUDA graph
  (the kernels' own GPU time, as in graph-captured decoding). Rows: ``copy_`` of q and k
  into preallocated tensors (the memory limit), the Triton kernel out of place and in
  place, posenc's torch.compile path (``compiled=True``), posenc's default
  (``compiled="auto"``), and transformers' Llama ``apply_rotary_pos_emb`` when
  transformers is installed. Prints ``t_copy / t_impl`` and ``peer / triton``.

Run on a machine with a GPU (exits 2 with the reason elsewhere):

    python benchmarks/rope_gpu.py            # ~1-2 minutes on one GPU
    pytest -q tests/test_rope_triton.py      # the same kernel, compiled, in the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from posenc.functional import rope_triton
from posenc.functional.rope import rope_cos_sin
from posenc.functional.rope_fast import apply_rotary

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


def _graph_time(fn, reps: int, warmup: int) -> float | None:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph; ``None`` (with a
    note) if ``fn`` cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - reported in the table as "-"
        print(f"note: not capturable in a CUDA graph ({type(err).__name__}: {str(err)[:120]})")
        return None
    return _time(graph.replay, reps, warmup)


def _hf():
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except Exception as err:  # noqa: BLE001 - a missing optional peer is reported, not fatal
        print(f"note: transformers not usable ({type(err).__name__}: {err}); its row is left out")
        return None
    return apply_rotary_pos_emb


def _check(q, k, cos, sin, dtype) -> float:
    """Largest error of the kernel beyond one rounding to ``dtype`` (both layouts, in and
    out of place, q and k) against the float64 formula."""
    u = torch.finfo(dtype).eps / 2  # half a unit in the last place: one rounding
    worst = 0.0
    for layout in ("half", "interleaved"):
        want = list(apply_rotary(q.double(), k.double(), cos, sin, layout=layout, compiled=False))  # float64
        got = apply_rotary(q, k, cos.float(), sin.float(), layout=layout, compiled="triton")
        q2, k2 = q.clone(), k.clone()
        apply_rotary(q2, k2, cos.float(), sin.float(), layout=layout, inplace=True, compiled="triton")
        for g, w in zip((*got, q2, k2), want * 2, strict=True):
            worst = max(worst, ((g.double() - w).abs() - u * w.abs()).max().item())
    return worst


def _ratio(num: float | None, den: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if num is None or den is None else fmt.format(num / den)


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
    cols = "t_copy/t_triton | t_copy/t_triton inplace | compiled/triton | auto/triton | transformers/triton"
    print(
        f"case | error | launched: {cols} | graph: t_copy/t_triton | triton us | compiled/triton | transformers/triton"
    )
    for dtype in [getattr(torch, n) for n in args.dtypes.split(",")]:
        for b, h, h_kv, s, d in CASES:
            q = torch.randn(b, h, s, d, device="cuda", dtype=dtype)
            k = torch.randn(b, h_kv, s, d, device="cuda", dtype=dtype)
            inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            cos, sin = rope_cos_sin(torch.arange(s, device="cuda") + 100_000, inv_freq.cuda(), dtype=torch.float64)
            worst = _check(q, k, cos, sin, dtype)
            failed |= worst > 1e-5
            c32, s32 = cos.float(), sin.float()
            oq, ok = torch.empty_like(q), torch.empty_like(k)
            cw, sw = torch.cat([c32, c32], -1).to(dtype)[None], torch.cat([s32, s32], -1).to(dtype)[None]
            impls = {
                "copy": lambda: (oq.copy_(q), ok.copy_(k)),  # noqa: B023
                "triton": lambda: apply_rotary(q, k, c32, s32, compiled="triton"),  # noqa: B023
                "inplace": lambda: apply_rotary(oq, ok, c32, s32, inplace=True, compiled="triton"),  # noqa: B023
                "compiled": lambda: apply_rotary(q, k, c32, s32, compiled=True),  # noqa: B023
                "auto": lambda: apply_rotary(q, k, c32, s32),  # noqa: B023
            }
            if hf is not None:
                impls["transformers"] = lambda: hf(q, k, cw, sw)  # noqa: B023
            t = {name: _time(fn, args.reps, args.warmup) for name, fn in impls.items()}
            g = {name: _graph_time(impls[name], args.reps, args.warmup) for name in ("copy", "triton", "compiled")}
            g["transformers"] = _graph_time(impls["transformers"], args.reps, args.warmup) if hf else None
            flag = " FAIL" if worst > 1e-5 else ""
            tri = t["triton"]
            print(
                f"{(b, h, h_kv, s, d)} {str(dtype).removeprefix('torch.')} | {worst:.1e}{flag}"
                f" | {t['copy'] / tri:.2f} | {t['copy'] / t['inplace']:.2f} | {t['compiled'] / tri:.2f}x"
                f" | {t['auto'] / tri:.2f}x | {_ratio(t.get('transformers'), tri)}"
                f" | {_ratio(g['copy'], g['triton'], '{:.2f}')} | {_ratio(g['triton'], 1e-3, '{:.0f}')}"
                f" | {_ratio(g['compiled'], g['triton'])} | {_ratio(g['transformers'], g['triton'])}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
