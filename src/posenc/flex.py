"""The FlexAttention backend (``Attention(..., backend="flex")``).

``torch.nn.attention.flex_attention`` compiled with ``torch.compile`` evaluates the
encoding's ``score_mod`` inside a fused kernel, so a bias encoding never builds an
``[h, s_q, s_k]`` tensor; a causal mask becomes a block mask built from tile
coordinates (``O((s / 128)^2)`` memory, no ``[s_q, s_k]`` tensor either). Each shape is
compiled once (static shapes); with a KV cache the keys are zero-padded to a multiple
of 128 and masked, so decoding recompiles once per 128 tokens, not every step.

What it cannot do on a CPU build of PyTorch 2.13 (each raises a clear error here,
never a silent fallback):

* backward: FlexAttention has no CPU backward kernel. Run ``backend="flex"`` under
  ``torch.no_grad()``/``torch.inference_mode()``, or train with ``backend="sdpa"``.
* dropout: FlexAttention has no attention dropout.
* encodings whose bias cannot be written one score at a time (CoPE): their
  ``score_mod()`` raises and names ``backend="sdpa"``.

On a CUDA GPU, forward and backward compile to Triton kernels (checked against SDPA,
gradients included, by ``tests/test_gpu.py`` where a GPU is present); the kernel
needs ``head_dim >= 16``, and a smaller one raises a clear error. FIRE's score_mod cannot
be differentiated there (its MLP weights are indexed once per hidden unit): training
FIRE on flex on CUDA raises, use ``backend="sdpa"``.

On a CPU, the keys are also zero-padded to a multiple of ``CPU_KEY_MULTIPLE`` (16) and
masked. Inductor's CPU template computes ``q @ k^T`` with a micro-GEMM whose N block is
16 keys; its N-tail kernel returns wrong values and NaN (reads of unset memory) when the
tail is one AVX2 vector (8 keys) and ``head_dim <= 16``: with PyTorch 2.13 on an
AVX2-only CPU, every key length ``s_k % 16 == 8`` (8, 24, 40, ...) at head_dim 8 or 16
gave wrong rows (AVX-512 CPUs were right). Padding to whole N blocks means the tail
kernel never runs, on either kind of CPU (``tests/test_flex.py`` runs the AVX2 path in a
subprocess with ``ATEN_CPU_CAPABILITY=avx2``).

Padding and packed-segment masks are supported through ``create_block_mask``, which
evaluates the mask at every ``(b, q, k)`` once (a ``[b, s_q, s_k]`` bool tensor).

Shapes: ``q [b, h, s_q, d]``, ``k``/``v`` ``[b, h_kv, s_k, d]``.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 128
#: Key lengths on a CPU are padded to this multiple (the CPU micro-GEMM's N block; see above).
CPU_KEY_MULTIPLE = 16
_COMPILED = None


def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``, built once per process: one
    static compilation per shape. Dynamic shapes are off because Inductor's CPU
    FlexAttention template fails to compile several score_mods with symbolic sizes on
    PyTorch 2.13 (C++ errors, lowering errors); decoding instead rounds the key
    length up to a multiple of ``BLOCK_SIZE`` (``pad_keys``), so one kernel serves
    ``BLOCK_SIZE`` steps."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return _COMPILED


def padded_length(s_q: int, s_k: int, device: torch.device) -> int:
    """The key length the kernel runs on: with a KV cache (``s_q < s_k``) ``s_k`` rounded
    up to a multiple of ``BLOCK_SIZE`` (one compilation per ``BLOCK_SIZE`` decode steps);
    on a CPU at least a multiple of ``CPU_KEY_MULTIPLE`` (the micro-GEMM tail bug above)."""
    multiple = BLOCK_SIZE if s_q < s_k else CPU_KEY_MULTIPLE if device.type == "cpu" else 1
    return -(-s_k // multiple) * multiple


def pad_keys(k: torch.Tensor, v: torch.Tensor, k_positions: torch.Tensor, s_q: int):
    """Pad ``k``/``v`` ``[b, h_kv, s_k, d]`` and ``k_positions`` ``[s_k]``/``[b, s_k]``
    with zeros to ``padded_length(s_q, s_k, device)`` keys; the block mask hides the padding."""
    extra = padded_length(s_q, k.shape[2], k.device) - k.shape[2]
    if extra == 0:
        return k, v, k_positions
    k = torch.nn.functional.pad(k, (0, 0, 0, extra))  # [b, h_kv, s_pad, d]
    v = torch.nn.functional.pad(v, (0, 0, 0, extra))
    return k, v, torch.nn.functional.pad(k_positions, (0, extra))


def block_mask(
    batch: int,
    s_q: int,
    s_k: int,
    *,
    n_keys: int,
    causal: bool,
    padding: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
    window: int | None = None,
):
    """BlockMask over ``s_q`` queries and ``s_k`` (possibly padded) keys, of which the
    first ``n_keys`` are real; the queries are the last ``s_q`` real keys (KV cache),
    so causal query ``i`` sees keys ``<= n_keys - s_q + i``. ``padding`` ``[b, n_keys]``
    (True = real token) and ``segment_ids`` ``[b, s]`` add their masks; ``window``
    (``posenc.attention.Intervention``) keeps keys ``> n_keys - s_q + i - window`` (and
    ``< n_keys - s_q + i + window`` when not causal). ``None`` when every key is visible."""
    past = torch.tensor(n_keys - s_q, device=device)
    n_real = torch.tensor(n_keys, device=device)
    if padding is None and segment_ids is None and window is None:
        if (not causal or s_q == 1) and n_keys == s_k:
            return None
        return _tile_mask(s_q, s_k, n_keys=n_keys, causal=causal, past=past, n_real=n_real, device=device)
    from torch.nn.attention.flex_attention import create_block_mask

    if padding is not None and padding.shape[-1] != s_k:
        padding = torch.nn.functional.pad(padding, (0, s_k - padding.shape[-1]), value=False)  # [b, s_k]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx < n_real
        if causal:
            ok = ok & (q_idx + past >= kv_idx)
        if padding is not None:
            ok = ok & padding[b, kv_idx]
        if segment_ids is not None:
            ok = ok & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])
        if window is not None:
            ok = ok & (q_idx + past - kv_idx < window)
            if not causal:
                ok = ok & (kv_idx - q_idx - past < window)
        return ok

    rows = batch if padding is not None or segment_ids is not None else None  # a window is the same for every row
    return create_block_mask(mask_mod, rows, None, s_q, s_k, device=device, BLOCK_SIZE=BLOCK_SIZE)


def temperature_score_mod(score_mod, temperature: float, *, device: torch.device):
    """A ``score_mod`` that multiplies the whole score by ``temperature``:
    ``temperature * score_mod(score, ...)`` (``temperature * score`` without one), so
    FlexAttention computes ``softmax(temperature * (q kᵀ / sqrt(d) + bias))`` like the
    other backends (``posenc.attention.Intervention``). The factor is a captured 0-d
    tensor, so another temperature does not recompile the kernel."""
    factor = torch.tensor(float(temperature), device=device)

    def scaled(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return score * factor

    return scaled


def _tile_mask(s_q: int, s_k: int, *, n_keys: int, causal: bool, past, n_real, device):
    """Causal / key-length BlockMask built from tile coordinates, without evaluating the
    mask at every ``(q, k)``: a ``BLOCK_SIZE`` tile is *full* when every query in it
    sees every key in it, *partial* when some do (only those evaluate the mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx < n_real
        if causal:
            ok = ok & (q_idx + past >= kv_idx)
        return ok

    p = n_keys - s_q
    qb, kb = -(-s_q // BLOCK_SIZE), -(-s_k // BLOCK_SIZE)
    q_first = torch.arange(qb, device=device) * BLOCK_SIZE  # [qb]
    q_last = torch.clamp(q_first + BLOCK_SIZE - 1, max=s_q - 1)  # [qb]
    k_first = torch.arange(kb, device=device) * BLOCK_SIZE  # [kb]
    k_last = k_first + BLOCK_SIZE - 1  # [kb]
    any_ = (k_first < n_keys)[None, :].expand(qb, kb)  # [qb, kb]
    full = ((k_last < n_keys) & (k_last < s_k))[None, :] & (q_first + BLOCK_SIZE <= s_q)[:, None]  # [qb, kb]
    if causal:
        any_ = any_ & (k_first[None, :] <= q_last[:, None] + p)
        full = full & (k_last[None, :] <= q_first[:, None] + p)
    partial = any_ & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = dense.sum(-1).to(torch.int32)[None, None]  # [1, 1, qb]
        idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]  # [1, 1, qb, kb]
        return num, idx

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(s_q, s_k)
    )


def check_flex_supported(q, k, v, *, parameters, dropout: float, bias) -> None:
    """Raise a clear error for what FlexAttention cannot do here (see module docstring)."""
    if bias is not None:
        raise ValueError(
            "backend='flex' computes the bias inside the kernel from pe.score_mod(); "
            "do not pass a materialized bias (use backend='sdpa' for that)"
        )
    if dropout > 0:
        raise ValueError(f"backend='flex' has no attention dropout (got dropout={dropout} in training); use 'sdpa'")
    wants_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(p.requires_grad for p in parameters)
    )
    if q.device.type == "cuda" and q.shape[-1] < 16:
        raise ValueError(
            f"FlexAttention's CUDA kernel needs head_dim >= 16 (PyTorch {torch.__version__}), got {q.shape[-1]}: "
            "use a larger head_dim or backend='sdpa'"
        )
    if wants_grad and q.device.type == "cpu":
        raise NotImplementedError(
            f"FlexAttention has no backward on CPU (PyTorch {torch.__version__}): run backend='flex' under "
            "torch.no_grad() or torch.inference_mode() for inference, or use backend='sdpa' for training"
        )


def flex_attend(q, k, v, score_mod, block_mask, *, gqa: bool) -> torch.Tensor:
    """Compiled FlexAttention -> ``[b, h, s_q, d]``. Recompiling past the limit is an
    error (dynamo would otherwise fall back silently to the unfused, materializing path)."""
    fn = compiled_flex_attention()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
