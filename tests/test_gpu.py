"""CUDA paths: every registered encoding's Transformer on a GPU against the same model on
CPU (logits and gradients), and the torch.compile'd FlexAttention backward on a GPU (which
CPU PyTorch does not have) against SDPA. Skipped without a CUDA GPU; the Triton rotary
kernel has its own checks in ``test_rope_triton.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import posenc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

#: Encodings whose bias FlexAttention computes inside the kernel (``score_mod``), plus
#: rope (no bias: plain attention with rotated q and k). FIRE trains only on SDPA there
#: (``test_fire_flex_training_on_cuda_is_refused_clearly``).
FLEX = ["alibi", "t5", "kerple", "sandwich", "shaw", "rope"]


@pytest.fixture(autouse=True)
def _exact_matmul():
    """float32 matmuls in full precision on the GPU (no TF32) so CPU and GPU agree."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _config(name: str, **extra) -> posenc.TransformerConfig:
    return posenc.TransformerConfig(
        vocab_size=32,
        dim=64,  # head_dim 16: the smallest FlexAttention's CUDA kernel takes
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        encoding=name,
        encoding_params=dict(posenc.get(name).example_params),
        max_len=64,
        **extra,
    )


def _loss_and_grads(model: posenc.Transformer, tokens: torch.Tensor):
    logits = model(tokens[:, :-1])  # [b, s, vocab]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", posenc.available())
def test_cuda_equals_cpu(name):
    """Forward and backward of the same weights on the GPU equal the CPU's (float32)."""
    torch.manual_seed(0)
    cpu = posenc.Transformer(_config(name)).eval()  # eval: randomized positions sample only in training
    gpu = copy.deepcopy(cpu).cuda()
    tokens = torch.randint(0, 32, (2, 41))
    want_logits, want_grads = _loss_and_grads(cpu, tokens)
    got_logits, got_grads = _loss_and_grads(gpu, tokens.cuda())
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", FLEX)
def test_flex_backward_on_cuda_equals_sdpa(name):
    """Compiled FlexAttention (forward and backward, causal, GQA, 150 tokens: a partial
    last block) gives SDPA's logits and gradients on the GPU."""
    torch.manual_seed(0)
    sdpa = posenc.Transformer(_config(name)).cuda().eval()
    with torch.no_grad():  # away from the initialisation, so the bias matters
        for p in sdpa.pe.parameters():
            p.add_(torch.rand_like(p) * 0.3)
    fx = posenc.Transformer(_config(name, backend="flex")).cuda().eval()
    fx.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 32, (2, 151), device="cuda")
    want_logits, want_grads = _loss_and_grads(sdpa, tokens)
    got_logits, got_grads = _loss_and_grads(fx, tokens)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_flex_head_dim_below_16_is_refused_clearly():
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=8, dim=32, num_heads=4, backend="flex")).cuda()
    with pytest.raises(ValueError, match="head_dim >= 16"):
        model(torch.randint(0, 8, (1, 20), device="cuda"))


def test_fire_flex_training_on_cuda_is_refused_clearly():
    """Inductor's FlexAttention backward on CUDA refuses FIRE's score_mod: a clear error
    up front instead; inference under no_grad still runs on flex."""
    sdpa = posenc.Transformer(_config("fire")).cuda().eval()
    fx = posenc.Transformer(_config("fire", backend="flex")).cuda().eval()
    fx.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 32, (2, 151), device="cuda")
    with pytest.raises(NotImplementedError, match="fire cannot be trained on backend='flex' on CUDA"):
        fx(tokens)
    with torch.no_grad():
        torch.testing.assert_close(fx(tokens), sdpa(tokens), atol=1e-4, rtol=1e-4)
