"""RoPE speed: posenc's fast rotary path against its peers and the memory limit.

Side by side in one run, on the same q and k:

* ``copy_``: copying q and k into preallocated tensors, the physical limit of a
  memory-bound pass (``clone`` would also pay page faults: the wrong yardstick);
  ``empty_like + copy_`` (forward) shows what a fresh output's page faults add, the
  floor of any out-of-place implementation;
* posenc ``apply_rotary`` (half and interleaved layouts; out of place, in place, eager);
* transformers' Llama ``apply_rotary_pos_emb`` (half layout; cos/sin from its
  ``LlamaRotaryEmbedding``, computed once outside the timed call, as a model does);
* rotary-embedding-torch ``RotaryEmbedding.rotate_queries_or_keys`` (interleaved, its
  own frequency cache);
* x-transformers ``apply_rotary_pos_emb`` (interleaved; freqs from its
  ``RotaryEmbedding``, computed once outside the timed call);
* torchtune ``RotaryPositionalEmbeddings`` (interleaved; takes ``[b, s, h, d]``, so it
  gets contiguous tensors in that layout, same bytes).

Each peer is compared with posenc in the peer's own layout. Timings: median of
``--reps`` repetitions after warm-up (compilation happens there), implementations
interleaved inside each repetition in a new seeded order each time, so that a change in machine load hits
all of them alike; ``torch.set_num_threads`` fixed and printed.

    PYTHONPATH=src python benchmarks/rope.py            # full run (minutes)
    PYTHONPATH=src python benchmarks/rope.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import posenc as posenc_lib
from posenc.functional.rope_fast import AUTO_COMPILE_AFTER, apply_rotary

BASE = 10000.0


# -- inputs ------------------------------------------------------------------------------------
def exact_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[s, d/2]`` float32 from float64 angles (the exact cache's contract)."""
    inv_freq = BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [d/2]
    theta = positions.to(torch.float64)[:, None] * inv_freq  # [s, d/2]
    return theta.cos().float(), theta.sin().float()


@dataclass(frozen=True)
class Case:
    b: int
    h: int
    h_kv: int
    s: int
    d: int
    dtype: torch.dtype
    past: int = 0  # decode: the new token sits at position `past`

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"({self.b}, {self.h}, {self.h_kv}, {self.s}, {self.d}) {dt}" + (" decode" if self.past else "")


# -- peers -------------------------------------------------------------------------------------
def load_torchtune_rope():
    """torchtune's RotaryPositionalEmbeddings, or the reason it cannot be used.

    ``import torchtune`` needs torchao, and torchtune 0.6.1 imports
    ``torchao.dtypes.nf4tensor``, gone from the torchao builds that import with this
    torch; its ``modules/position_embeddings.py`` only needs torch, so it is loaded from
    the installed package's file when the package itself cannot be imported.
    """
    try:
        from torchtune.modules import RotaryPositionalEmbeddings

        return RotaryPositionalEmbeddings, "torchtune (imported)"
    except Exception as err:  # noqa: BLE001 - report why, then try the file
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:80]}"
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        return None, f"torchtune not installed ({reason})"
    path = os.path.join(spec.submodule_search_locations[0], "modules", "position_embeddings.py")
    mod_spec = importlib.util.spec_from_file_location("_torchtune_position_embeddings", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.RotaryPositionalEmbeddings, f"torchtune (package import fails: {reason}; file loaded)"


def peers(case: Case, q: torch.Tensor, k: torch.Tensor, notes: list[str]) -> dict[str, tuple[str, Callable, bool]]:
    """``name -> (layout, fn(q, k) -> (q_rot, k_rot), bshd)`` for every peer that imports;
    ``bshd``: the peer takes ``[b, s, h, d]`` tensors instead of ``[b, h, s, d]``."""
    out: dict[str, tuple[str, Callable, bool]] = {}
    s_pos = torch.arange(case.past, case.past + case.s)
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

        cfg = LlamaConfig(
            hidden_size=case.h * case.d,
            num_attention_heads=case.h,
            num_key_value_heads=case.h_kv,
            max_position_embeddings=max(8192, case.past + case.s),
        )
        cos, sin = LlamaRotaryEmbedding(cfg)(q, s_pos[None])  # [1, s, d], once per forward in a model
        out["transformers"] = ("half", lambda q, k: hf_apply(q, k, cos, sin), False)
    except Exception as err:  # noqa: BLE001
        notes.append(f"transformers unavailable: {err}")
    try:
        from rotary_embedding_torch import RotaryEmbedding

        ret = RotaryEmbedding(dim=case.d)
        out["rotary-embedding-torch"] = (
            "interleaved",
            lambda q, k: (
                ret.rotate_queries_or_keys(q, offset=case.past),
                ret.rotate_queries_or_keys(k, offset=case.past),
            ),
            False,
        )
    except Exception as err:  # noqa: BLE001
        notes.append(f"rotary-embedding-torch unavailable: {err}")
    try:
        from x_transformers.x_transformers import RotaryEmbedding as XRot
        from x_transformers.x_transformers import apply_rotary_pos_emb as x_apply

        freqs, scale = XRot(case.d)(s_pos)  # [1, s, d], once per forward in x-transformers
        out["x-transformers"] = (
            "interleaved",
            lambda q, k: (x_apply(q, freqs, scale), x_apply(k, freqs, scale)),
            False,
        )
    except Exception as err:  # noqa: BLE001
        notes.append(f"x-transformers unavailable: {err}")
    tt_cls, tt_note = load_torchtune_rope()
    if tt_cls is not None:
        tt = tt_cls(case.d, max_seq_len=max(8192, case.past + case.s))
        pos = None if case.past == 0 else s_pos[None]
        # torchtune's layout is [b, s, h, d]: it gets q and k contiguous in that layout.
        out["torchtune"] = ("interleaved", lambda q, k: (tt(q, input_pos=pos), tt(k, input_pos=pos)), True)
    notes.append(tt_note)
    return out


# -- timing ------------------------------------------------------------------------------------
def measure(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call; implementations interleaved within each repetition, in a
    new order every repetition (a seeded shuffle)."""
    for name, fn in fns.items():
        # posenc's "auto" compiles a shape once it has come AUTO_COMPILE_AFTER times:
        # warm up past that, so the timed calls are the steady state of a training loop.
        for _ in range(warmup + AUTO_COMPILE_AFTER + 1 if name.startswith("posenc") else warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    items = list(fns.items())
    try:
        order = random.Random(0)
        for _ in range(reps):
            # A new order every repetition: a call is slowed by the one before it (a peer
            # that runs for milliseconds evicts the caches), so no implementation may keep
            # the same predecessor (rotating the list would keep every predecessor).
            for name, fn in order.sample(items, len(items)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_t(sec: float) -> str:
    return f"{sec * 1e3:.3f} ms" if sec >= 1e-3 else f"{sec * 1e6:.1f} µs"


def _forward_fns(impls: dict, q, k, q_bshd, k_bshd) -> dict[str, Callable[[], object]]:
    """Zero-argument callables for the forward pass; ``copy_`` is the yardstick."""
    q_ip, k_ip = q.clone(), k.clone()  # in-place runs rotate these repeatedly
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)

    def bind(fn: Callable, args: tuple) -> Callable[[], object]:
        return lambda: fn(*args)

    fns = {}
    for name, (_, fn, bshd) in impls.items():
        args = (q_ip, k_ip) if "inplace" in name else ((q_bshd, k_bshd) if bshd else (q, k))
        fns[name] = bind(fn, args)

    def copy_yardstick():
        q_out.copy_(q)
        k_out.copy_(k)

    def alloc_copy():  # what any out-of-place result pays: fresh pages, then one pass
        torch.empty_like(q).copy_(q)
        torch.empty_like(k).copy_(k)

    fns["copy_"] = copy_yardstick
    fns["empty_like + copy_"] = alloc_copy
    return fns


def _backward_fns(impls: dict, q, k, q_bshd, k_bshd) -> dict[str, Callable[[], object]]:
    """Forward + backward callables; the yardstick copies twice (forward output and
    backward input gradient), the traffic floor of a rotation's forward and backward."""
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    leaves = (q.clone().requires_grad_(), k.clone().requires_grad_())
    leaves_bshd = (q_bshd.clone().requires_grad_(), k_bshd.clone().requires_grad_())
    grads_bshd = [gq.transpose(1, 2).contiguous(), gk.transpose(1, 2).contiguous()]

    def bind(fn: Callable, inputs: tuple, grads: list) -> Callable[[], object]:
        def step():
            inputs[0].grad = inputs[1].grad = None
            torch.autograd.backward(list(fn(*inputs)), grads)

        return step

    fns = {}
    for name, (_, fn, bshd) in impls.items():
        fns[name] = bind(fn, leaves_bshd if bshd else leaves, grads_bshd if bshd else [gq, gk])
    q_out, k_out, q_gin, k_gin = (torch.empty_like(t) for t in (q, k, q, k))

    def copy_yardstick():
        q_out.copy_(q)
        k_out.copy_(k)
        q_gin.copy_(gq)
        k_gin.copy_(gk)

    fns["copy_"] = copy_yardstick
    return fns


def run_case(case: Case, reps: int, warmup: int, backward: bool, notes: list[str]) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(case.b, case.h, case.s, case.d, dtype=case.dtype)
    k = torch.randn(case.b, case.h_kv, case.s, case.d, dtype=case.dtype)
    cos, sin = exact_tables(torch.arange(case.past, case.past + case.s), case.d)
    q_bshd, k_bshd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # torchtune layout
    peer_fns = peers(case, q, k, notes)

    rope = posenc_lib.create("rope", head_dim=case.d)
    positions = torch.arange(case.past, case.past + case.s)

    def posenc(layout: str, **kw) -> Callable:
        return lambda q, k: apply_rotary(q, k, cos, sin, layout=layout, **kw)

    # Sanity: every peer computes the same function as posenc in its layout (float32).
    if case.dtype == torch.float32:
        with torch.no_grad():
            for name, (layout, fn, bshd) in peer_fns.items():
                got = fn(q_bshd, k_bshd) if bshd else fn(q, k)
                got = [g.transpose(1, 2) for g in got] if bshd else got
                want = posenc(layout)(q, k)
                err = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
                if err > 1e-3:
                    notes.append(f"{case.label()}: {name} differs from posenc ({layout}) by {err:.2e}")

    rows = []
    passes = [("forward", False)] + ([("forward+backward", True)] if backward else [])
    for pass_name, with_grad in passes:
        impls: dict[str, tuple[str, Callable, bool]] = {
            "posenc half": ("half", posenc("half"), False),
            "posenc interleaved": ("interleaved", posenc("interleaved"), False),
            "posenc half eager": ("half", posenc("half", compiled=False), False),
            # the whole encoding hook, table lookup and checks included (what a model calls)
            "posenc rope.rotate": ("half", lambda q, k: rope.rotate(q, k, positions, positions), False),
        }
        if not with_grad:
            impls["posenc half inplace"] = ("half", posenc("half", inplace=True), False)
            impls["posenc interleaved inplace"] = ("interleaved", posenc("interleaved", inplace=True), False)
        impls.update(peer_fns)
        if with_grad:
            with torch.enable_grad():
                t = measure(_backward_fns(impls, q, k, q_bshd, k_bshd), reps, warmup)
        else:
            with torch.no_grad():
                t = measure(_forward_fns(impls, q, k, q_bshd, k_bshd), reps, warmup)
        rows.append({"case": case, "pass": pass_name, "t": t, "layouts": {n: v[0] for n, v in impls.items()}})
    return rows


def print_case(row: dict) -> None:
    case, t, layouts = row["case"], row["t"], row["layouts"]
    print(f"\n#### {case.label()}, {row['pass']}\n")
    print("| implementation | layout | median | t_copy / t | peer / posenc (same layout) |")
    print("|---|---|---:|---:|---:|")
    tc = t["copy_"]
    print(f"| copy_ (yardstick) | - | {fmt_t(tc)} | 1.00 | |")
    for name, sec in t.items():
        if name == "copy_":
            continue
        if name not in layouts:  # another yardstick
            print(f"| {name} (yardstick) | - | {fmt_t(sec)} | {tc / sec:.2f} | |")
            continue
        layout = layouts[name]
        ratio = "" if name.startswith("posenc") else f"{sec / t[f'posenc {layout}']:.2f}×"
        print(f"| {name} | {layout} | {fmt_t(sec)} | {tc / sec:.2f} | {ratio} |")


def print_summary(rows: list[dict]) -> None:
    peers_seen = sorted({n for r in rows for n in r["layouts"] if not n.startswith("posenc")})
    print("\n### Summary: posenc speed-up over each peer (peer time / posenc time, same layout)\n")
    print("| case | pass | t_copy / t_posenc half | t_copy / t_posenc half inplace | " + " | ".join(peers_seen) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(peers_seen))
    for r in rows:
        t, lay = r["t"], r["layouts"]
        ip = t.get("posenc half inplace")
        ip_txt = "-" if ip is None else f"{t['copy_'] / ip:.2f}"
        cells = [f"{t[p] / t[f'posenc {lay[p]}']:.2f}×" if p in t else "-" for p in peers_seen]
        print(
            f"| {r['case'].label()} | {r['pass']} | {t['copy_'] / t['posenc half']:.2f} | "
            f"{ip_txt} | " + " | ".join(cells) + " |"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke run)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 15; quick 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default=None, help="override: 'b,h,h_kv,s,d;...' (no decode step)")
    ap.add_argument("--decode-only", action="store_true", help="only the decode step s = 1")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # a long run shows each table as it ends
    torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 15)
    dtypes = [getattr(torch, n) for n in args.dtypes.split(",")]
    if args.quick:
        shapes = [(1, 8, 2, 512, 128)]
        decode = [(1, 32, 8, 1, 128, 2047)]
    else:
        shapes = [(1, 32, 8, 2048, 128), (1, 32, 32, 8192, 128), (1, 32, 8, 2048, 64), (1, 32, 8, 2048, 256)]
        decode = [(1, 32, 8, 1, 128, 2047)]
    if args.shapes:
        shapes = [tuple(int(v) for v in part.split(",")) for part in args.shapes.split(";")]
        decode = []
    if args.decode_only:
        shapes = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"cpu_count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load average {load[0]:.2f} at start"
    )
    print(f"median of {reps} repetitions after {args.warmup} warm-up calls; command: python {' '.join(sys.argv)}")
    notes: list[str] = []
    rows = []
    # Shapes outer, dtypes inner: the headline shape comes first in both dtypes.
    for b, h, h_kv, s, d in shapes:
        for dtype in dtypes:
            case = Case(b, h, h_kv, s, d, dtype)
            # forward+backward everywhere would take most of an hour on 2 shared cores:
            # it runs at s < 8192 and d <= 128 (the headline shape and d = 64).
            backward = not args.no_backward and s < 8192 and d <= 128
            for row in run_case(case, reps, args.warmup, backward, notes):
                print_case(row)
                rows.append(row)
    for b, h, h_kv, s, d, past in decode:
        for dtype in dtypes:
            case = Case(b, h, h_kv, s, d, dtype, past=past)
            for row in run_case(case, max(reps, 50), args.warmup, False, notes):
                print_case(row)
                rows.append(row)
    print_summary(rows)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"\nload average {load[0]:.2f} at end")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")


if __name__ == "__main__":
    main()
