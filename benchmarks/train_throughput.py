"""Training throughput at the study's shapes: posenc's training step against x-transformers.

The runs are the quick preset's (``plan_study("quick")``): width 64, 2 layers, 4 heads,
MLP ratio 4, float32; copy at batch 64 with lengths 1..8 mixed in every batch (as the
study trains: 3..17 tokens wide, padded to 17 by the fast step), Shakespeare at batch 32
with windows of 64 characters. Each row times one optimizer step (forward, masked
cross-entropy, backward, gradient clipping at 1.0, AdamW) on the run's own training
batches (drawn before timing, the same batches for every model), three ways, round-robin:

* ``posenc fast``: ``posenc.experiments.fast_step.FastStep``, the step ``train_run`` uses
  (the traced forward + backward compiled with Inductor, fused AdamW);
* ``posenc ref``: the reference step (eager, default AdamW), the step before issue #24;
* ``x-transformers``: ``TransformerWrapper(Decoder(...))`` of the same sizes and
  encoding, eager (as its README trains it), the same loss, clipping and AdamW.

Compiling is not timed per step: it is measured once (in a fresh Inductor cache unless
``--warm-cache``) and spread over the run's steps (4000 for copy, 1000 for Shakespeare):
``per run`` = compile + steps x median step. The ratio is x-transformers' per-run time
over posenc fast's. The last line is the smallest ratio over all rows.

Encoding pairs (posenc name <-> x-transformers flags):

    learned     <-> use_abs_pos_emb=True (learned absolute table)
    sinusoidal  <-> scaled_sinu_pos_emb=True (sinusoidal; x-transformers adds a learned scale)
    rope        <-> rotary_pos_emb=True, rotary_emb_dim=head_dim (full rotary, as posenc)
    alibi       <-> alibi_pos_bias=True
    t5          <-> rel_pos_bias=True (x-transformers refuses its SDPA "flash" path with it)

Then the study's own figure: seconds per run (``train_run``, training and evaluation) of
the quick preset's copy and Shakespeare runs of ``--e2e`` encodings, reference step then
fast step, in fresh run folders.

    PYTHONPATH=src python benchmarks/train_throughput.py            # full run (~15 min on 2 cores)
    PYTHONPATH=src python benchmarks/train_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PAIRS = {
    "learned": {"use_abs_pos_emb": True},
    "sinusoidal": {"use_abs_pos_emb": True, "scaled_sinu_pos_emb": True},
    "rope": {"use_abs_pos_emb": False, "attn": {"rotary_pos_emb": True}},
    "alibi": {"use_abs_pos_emb": False, "attn": {"alibi_pos_bias": True}},
    "t5": {"use_abs_pos_emb": False, "attn": {"rel_pos_bias": True}},
}


def build_xt(name: str, vocab: int, dim: int, depth: int, heads: int, seq: int):
    from x_transformers import Decoder, TransformerWrapper

    flags = dict(PAIRS[name])
    attn = dict(flags.pop("attn", {}))
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


def eager_step(model, opt, grad_clip: float, masked_loss, *, positions: bool):
    def step(inputs, targets, mask, pos, count):
        logits = model(inputs, pos) if positions else model(inputs)
        loss = masked_loss(logits, targets, mask, count)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return loss

    return step


def bench_row(config, args) -> dict:
    """Median step times of the three steps on ``args.batches`` training batches of ``config``."""
    from posenc.experiments import fast_step
    from posenc.experiments import train as T

    tc = config.train
    run_setup = T.setup(config)
    gen = torch.Generator().manual_seed(T.derive_seed(tc.seed, T.DATA_STREAM))
    batches = []
    for _ in range(args.batches):
        inputs, targets, mask, positions = T.training_batch(run_setup, gen)
        count = float(targets.numel()) if mask is None else float(mask.sum())
        batches.append((inputs, targets, mask, positions, count))
    width = max(b[0].shape[1] for b in batches)  # the widest batch (x-transformers' tables: max_len, as posenc)
    torch.manual_seed(0)
    fast_model = T.build_model(config, run_setup.vocab_size, run_setup.max_len).train()
    ref_model = T.build_model(config, run_setup.vocab_size, run_setup.max_len).train()
    m = config.model
    xt = build_xt(m.encoding, run_setup.vocab_size, m.dim, m.num_layers, m.num_heads, run_setup.max_len).train()
    bucket = None if run_setup.task is None else run_setup.task.sequence_length(config.task.train_length) - 1
    fast_opt = fast_step.make_optimizer(fast_model, "fast", lr=1e-4, weight_decay=0.0)
    steps = {
        "posenc fast": fast_step.FastStep(fast_model, fast_opt, tc.grad_clip, bucket=bucket),
        "posenc ref": eager_step(
            ref_model,
            torch.optim.AdamW(ref_model.parameters(), lr=1e-4),
            tc.grad_clip,
            fast_step.masked_loss,
            positions=True,
        ),
        "x-transformers": eager_step(
            xt, torch.optim.AdamW(xt.parameters(), lr=1e-4), tc.grad_clip, fast_step.masked_loss, positions=False
        ),
    }
    t0 = time.perf_counter()
    steps["posenc fast"](*batches[0])  # traces and compiles
    compile_s = time.perf_counter() - t0
    for fn in steps.values():
        for i in range(args.warmup):
            fn(*batches[i % len(batches)])
    gc.collect()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps.items())
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        for k, fn in order[i % 3 :] + order[: i % 3]:  # rotate who goes first
            t0 = time.perf_counter()
            fn(*batch)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = statistics.mean(b[0].numel() for b in batches)  # unpadded tokens per batch
    params = {
        "posenc": sum(p.numel() for p in fast_model.parameters()),
        "x-t": sum(p.numel() for p in xt.parameters()),
    }
    return {"med": med, "compile": compile_s, "tokens": tokens, "params": params, "width": width}


def e2e_child(task: str, encoding: str, mode: str, threads: int) -> None:
    """One whole run in this (fresh) process, in a fresh run folder and Inductor cache."""
    from posenc.experiments.study import plan_study
    from posenc.experiments.train import train_run

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="posenc-bench-inductor-")
    (config,), _ = plan_study("quick", encodings=[encoding], tasks=[task], threads=threads)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train_run(config, d, step_mode=mode)
        print(f"seconds {time.perf_counter() - t0:.3f}")


def e2e(configs, args) -> list[tuple[str, str, float, float]]:
    """Seconds per whole run (``train_run``) with the reference and the fast step, each in
    a fresh process with a fresh Inductor cache (compiling included)."""
    out = []
    for config in configs:
        times = {}
        for mode in ("reference", "fast"):
            cmd = [sys.executable, __file__, "--e2e-child", config.task.name, config.model.encoding, mode]
            proc = subprocess.run([*cmd, "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            times[mode] = float(proc.stdout.strip().splitlines()[-1].split()[-1])
        out.append((config.task.name, config.model.encoding, times["reference"], times["fast"]))
        print(
            f"  {config.task.name:11s} {config.model.encoding:10s} {config.train.steps} steps: reference "
            f"{times['reference']:.1f} s, fast {times['fast']:.1f} s ({times['reference'] / times['fast']:.2f}x)"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two encodings, few steps, no end-to-end runs")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=40, help="timed steps per model and row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", type=int, default=20, help="distinct training batches cycled through")
    ap.add_argument("--encodings", default=",".join(PAIRS))
    ap.add_argument("--tasks", default="copy,shakespeare")
    ap.add_argument("--e2e", default="rope", help="encodings of the end-to-end runs ('' for none)")
    ap.add_argument("--warm-cache", action="store_true", help="use the default Inductor cache (compile time: warm)")
    ap.add_argument("--e2e-child", nargs=3, metavar=("TASK", "ENCODING", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.e2e_child:
        torch.set_num_threads(args.threads)
        return e2e_child(*args.e2e_child, args.threads)
    if args.quick:
        args.steps, args.warmup, args.batches, args.encodings, args.e2e = 6, 2, 4, "rope,alibi", ""
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="posenc-bench-inductor-")
    from posenc.experiments.study import plan_study

    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, CPU {model_name}, cpu_count {os.cpu_count()}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"median of {args.steps} steps after {args.warmup} warm-up steps, {args.batches} training batches cycled; "
        f"Inductor cache {'default (warm)' if args.warm_cache else 'fresh (cold compile)'}; "
        f"command: python {' '.join(sys.argv)}\n"
    )
    wanted = [e for e in args.encodings.split(",") if e]
    tasks = [t for t in args.tasks.split(",") if t]
    rows = []
    for task in tasks:
        configs, _ = plan_study("quick", encodings=wanted, tasks=[task], threads=args.threads)
        for config in configs:
            r = bench_row(config, args)
            n = config.train.steps
            med, c = r["med"], r["compile"]
            run_fast = c + n * med["posenc fast"]
            run_xt = n * med["x-transformers"]
            rows.append((config, r, run_fast, run_xt))
            print(
                f"{task:11s} {config.model.encoding:10s} step ms: fast {1e3 * med['posenc fast']:6.2f}  ref "
                f"{1e3 * med['posenc ref']:6.2f}  x-t {1e3 * med['x-transformers']:6.2f}; compile {c:5.1f} s; "
                f"per run of {n}: fast {run_fast:6.1f} s, x-t {run_xt:6.1f} s, ratio {run_xt / run_fast:.2f}x"
            )
    print(
        "\n| task (batch x width) | encoding | posenc fast ms/step | posenc ref ms/step | x-transformers ms/step "
        "| step ratio x-t / fast | compile s | steps/run | s/run fast (compile incl.) | s/run x-t "
        "| ratio per run | params posenc | params x-t |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config, r, run_fast, run_xt in rows:
        med = r["med"]
        print(
            f"| {config.task.name} ({config.train.batch_size} x {r['width']}) | {config.model.encoding} | "
            f"{1e3 * med['posenc fast']:.2f} | {1e3 * med['posenc ref']:.2f} | {1e3 * med['x-transformers']:.2f} | "
            f"{med['x-transformers'] / med['posenc fast']:.2f}x | {r['compile']:.1f} | {config.train.steps} | "
            f"{run_fast:.1f} | {run_xt:.1f} | {run_xt / run_fast:.2f}x | {r['params']['posenc']:,} | "
            f"{r['params']['x-t']:,} |"
        )
    e2e_names = [e for e in args.e2e.split(",") if e]
    if e2e_names:
        print("\nend to end (train_run: training + evaluation), quick preset, seconds per run:")
        configs, _ = plan_study("quick", encodings=e2e_names, tasks=tasks, threads=args.threads)
        results = e2e(configs, args)
        print("\n| task | encoding | steps | s/run reference step | s/run fast step | reference / fast |")
        print("|---|---|---:|---:|---:|---:|")
        for (task, enc, ref, fast), config in zip(results, configs, strict=True):
            print(f"| {task} | {enc} | {config.train.steps} | {ref:.1f} | {fast:.1f} | {ref / fast:.2f}x |")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print(f"min ratio vs x-transformers: {min(run_xt / run_fast for _, _, run_fast, run_xt in rows):.2f}")


if __name__ == "__main__":
    main()
