"""A native CPU kernel for the in-place rotation of the half (NeoX/Llama) layout.

A private backend of :func:`posenc.functional.apply_rotary` (which routes large in-place
half-layout rotations here); call ``apply_rotary``, not :func:`kernel`.

Why it exists: in the half layout a pair is ``(x_i, x_{i + r/2})``, so an in-place
rotation reads both halves and writes both. ``torch.compile`` (inductor) cannot prove
that a loop writing ``x_i`` before it reads ``x_{i + r/2}``'s partner is safe, so it
rotates into a fresh buffer and copies back (two passes plus the page faults of a new
buffer: 0.25 of the ``copy_`` limit in ``benchmarks/rope.py``). This kernel loops over
pairs: each iteration loads ``x_i`` and ``x_{i + r/2}`` and stores both, one read and
one write of every element, the same memory traffic as ``copy_``.

Math (Su et al. 2021, arXiv:2104.09864), for every row and pair ``i < r/2``:

    x_i       <- x_i cos θ_i − x_{i+r/2} sin θ_i
    x_{i+r/2} <- x_{i+r/2} cos θ_i + x_i sin θ_i

computed in float32 and rounded once (round to nearest even for bfloat16), like the
compiled path. ``-ffp-contract=off``: no fused multiply-add, so float32 results equal
the eager formula's bit for bit.

Build: plain C (no torch headers), compiled once per machine with the system C compiler
(``$CC`` or ``cc``; the same one ``torch.compile`` needs on CPU) into
``$XDG_CACHE_HOME/posenc`` (default ``~/.cache/posenc``), keyed by the source, the flags
and the CPU's feature flags (``-march=native``), written atomically, loaded with
``ctypes``. Threads: OpenMP (``-fopenmp``) with ``torch.get_num_threads()`` threads; the
library's ``libgomp.so.1`` resolves to the one torch has already loaded (same soname), so
the kernel runs on torch's thread pool instead of competing with it (Python threads did:
libgomp's workers spin after each torch op and took the cores from them). When no
compiler works, ``available()`` is False, ``unavailable_reason()`` says why, and
``apply_rotary`` warns once and uses its other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.bfloat16)
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11")

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* nearest even */
    return (uint16_t)(u >> 16);
}

/* Rows [begin, end) of x viewed as [b, h, s, d] with strides (sb, sh, ss, 1); the table
   of row (bi, hi, t) starts at cos + bi * tb + t * half (tb = 0: one table for all).
   The row index is split once, then (bi, hi, t) is carried: no division per row. */
#define ROPE_HALF(NAME, T, LOAD, STORE)                                                   \
void NAME(T *x, const float *cos, const float *sin, int64_t begin, int64_t end,          \
          int64_t h, int64_t s, int64_t sb, int64_t sh, int64_t ss, int64_t half,        \
          int64_t tb) {                                                                   \
    int64_t t = begin % s, hi = (begin / s) % h, bi = begin / s / h;                      \
    for (int64_t row = begin; row < end; ++row) {                                         \
        T *restrict p1 = x + bi * sb + hi * sh + t * ss;                                  \
        T *restrict p2 = p1 + half;                                                       \
        const float *restrict c = cos + bi * tb + t * half;                               \
        const float *restrict sn = sin + bi * tb + t * half;                              \
        for (int64_t i = 0; i < half; ++i) {                                              \
            float a = LOAD(p1[i]), b = LOAD(p2[i]);                                       \
            float ac = a * c[i], bs = b * sn[i], bc = b * c[i], as = a * sn[i];           \
            p1[i] = STORE(ac - bs);                                                       \
            p2[i] = STORE(bc + as);                                                       \
        }                                                                                 \
        if (++t == s) { t = 0; if (++hi == h) { hi = 0; ++bi; } }                         \
    }                                                                                     \
}
#define ID(v) (v)
ROPE_HALF(rows_f32, float, ID, ID)
ROPE_HALF(rows_bf16, uint16_t, bf2f, f2bf)

/* All rows, split evenly over the OpenMP threads (torch's own pool: see the docstring). */
#define ROPE_PARALLEL(NAME, ROWS, T)                                                      \
void NAME(T *x, const float *cos, const float *sin, int64_t rows, int64_t nthreads,      \
          int64_t h, int64_t s, int64_t sb, int64_t sh, int64_t ss, int64_t half,        \
          int64_t tb) {                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                   \
    for (int64_t i = 0; i < nthreads; ++i)                                                \
        ROWS(x, cos, sin, rows * i / nthreads, rows * (i + 1) / nthreads,                 \
             h, s, sb, sh, ss, half, tb);                                                 \
}
ROPE_PARALLEL(rope_half_f32, rows_f32, float)
ROPE_PARALLEL(rope_half_bf16, rows_bf16, uint16_t)
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "posenc"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cc, _cpu_flags()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"rope_native_{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "rope_native.c", Path(tmp) / "rope_native.so"
            src.write_text(_SOURCE)
            res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
            os.replace(out, lib)  # atomic: a concurrent build writes the same bytes
    dll = ctypes.CDLL(str(lib))
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    for name in ("rope_half_f32", "rope_half_bf16"):
        fn = getattr(dll, name)
        fn.argtypes = [vp, vp, vp, *([i64] * 9)]  # x, cos, sin, rows, threads, h, s, strides, half, tb
        fn.restype = None
    return dll


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "dll" not in _state:
            try:
                _state["dll"] = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _state["dll"], _state["reason"] = None, str(err)
        return _state["dll"]  # type: ignore[return-value]


def available() -> bool:
    """True when the kernel is built (building it on first use)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the kernel could not be built, or ``None``."""
    _library()
    return _state.get("reason")  # type: ignore[return-value]


def supports(x: torch.Tensor, rotary_dim: int) -> bool:
    """Whether ``x [b, h, s, d]`` can be rotated in place here: CPU, float32 or
    bfloat16, unit stride in the last dimension, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and x.dim() == 4
        and x.stride(-1) == 1
        and x.numel() > 0
        and not x.requires_grad
        and rotary_dim % 2 == 0
    )


def _table(t: torch.Tensor, b: int, s: int, half: int) -> tuple[torch.Tensor, int]:
    """``[s, r/2]`` or ``[b|1, 1, s, r/2]`` (as ``apply_rotary`` shapes them) -> a
    contiguous float32 table and its batch stride (0: shared by the batch)."""
    t = t.to(torch.float32)
    if t.dim() == 2 or t.shape[0] == 1:
        return t.reshape(s, half).contiguous(), 0
    return t.reshape(b, s, half).contiguous(), s * half


def kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate ``x [b, h, s, d]`` in place (half layout, the first ``rotary_dim``
    dimensions) with ``cos``/``sin`` ``[s, r/2]`` or ``[b|1, 1, s, r/2]``; returns ``x``.
    The caller checks ``supports(x, rotary_dim)`` and the table shapes."""
    dll = _library()
    if dll is None:
        raise RuntimeError(f"the native rotary kernel is unavailable: {unavailable_reason()}")
    b, h, s, _ = x.shape
    half = rotary_dim // 2
    c, tb = _table(cos, b, s, half)
    sn, _ = _table(sin, b, s, half)  # both kept alive until the call returns
    fn = dll.rope_half_f32 if x.dtype == torch.float32 else dll.rope_half_bf16
    rows = b * h * s
    n = max(1, min(torch.get_num_threads(), rows // 64))
    fn(x.data_ptr(), c.data_ptr(), sn.data_ptr(), rows, n, h, s, *x.stride()[:3], half, tb)
    return x
