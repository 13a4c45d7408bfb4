"""The C++ CPU kernels against the PyTorch path they stand beside, on random inputs in fp32 and bf16. Every
kernel must build here (a build failure fails these tests, it does not skip them)."""
from __future__ import annotations

import pytest
import torch

from loraserve.layers import activation, attention, norm, rotary, sampler
from loraserve.layers.cpu_kernels import build_all, cpu_kernel, fused_ops_module
from loraserve.layers.forward_batch import AttentionMetadata

DTYPES = [torch.float32, torch.bfloat16]
FUSED = [torch.bfloat16]  # the fused elementwise kernels serve bf16; float32 stays on the reference path


def test_every_kernel_builds():
    assert all(build_all().values()), build_all()


def test_a_killed_build_does_not_block_later_starts():
    """A build killed mid-way leaves torch's lock file behind; the next start must not wait on it forever."""
    import subprocess
    import sys

    from loraserve.layers.cpu_kernels import _CSRC, _build_dir

    assert build_all()["LoRA runs"]
    lock = _build_dir(_CSRC / "lora_segments.cpp") / "lock"
    lock.touch()
    code = "from loraserve.layers.cpu_kernels import lora_module; assert lora_module() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not lock.exists()


def test_float32_stays_on_the_reference_path():
    x = torch.randn(4, 8)
    assert cpu_kernel(fused_ops_module, x) is None and cpu_kernel(fused_ops_module, x.bfloat16()) is not None


@pytest.fixture
def torch_path(monkeypatch):
    """Call the wrapped function with the C++ kernels switched off (the portable path)."""
    def run(fn, *args):
        with monkeypatch.context() as m:
            for module in (activation, attention, norm, rotary, sampler):
                for name in ("fused_ops_module", "paged_attention_module"):
                    if hasattr(module, name):
                        m.setattr(module, name, lambda: None)
            return fn(*args)
    return run


def ulps(dtype: torch.dtype) -> dict:
    """Tolerance: exact in fp32 up to reassociation; one bf16 step where an exp or a reduction enters."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_and_residual_add(dtype, offset, torch_path):
    torch.manual_seed(0)
    layer = norm.RMSNorm(96, 1e-6, offset)
    layer.weight.data = torch.randn(96).to(dtype)
    x, residual = torch.randn(37, 96, dtype=dtype) * 3, torch.randn(37, 96, dtype=dtype)
    torch.testing.assert_close(layer(x), torch_path(layer, x), **ulps(dtype))
    want, want_residual = torch_path(layer.add_and_norm, x, residual.clone())
    got, got_residual = layer.add_and_norm(x, residual.clone())
    assert torch.equal(got_residual, want_residual)  # the stream itself is exact
    torch.testing.assert_close(got, want, **ulps(dtype))
    heads = torch.randn(5, 4, 96, dtype=dtype)[:, 1:]  # a non-contiguous view, as q/k norms get
    torch.testing.assert_close(layer(heads), torch_path(layer, heads), **ulps(dtype))


@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_and_kv_write(dtype, rotary_dim, torch_path):
    """q, k, v as views into one packed qkv row; partial rotary leaves the tail of each head alone."""
    torch.manual_seed(1)
    tokens, heads, kv_heads, dim = 11, 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    angles = torch.rand(tokens, rotary_dim // 2) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)[:, None]
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)[:, None]
    slots = torch.randperm(8 * 4)[:tokens]
    results = []
    for use_kernel in (True, False):
        buffer = qkv.clone()
        q = buffer[:, :heads * dim].view(tokens, heads, dim)
        k = buffer[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        v = buffer[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
        if rotary_dim == 32:  # Qwen3's q/k norms hand over fresh contiguous q and k, v stays a view
            q, k = q.clone(), k.clone()
        caches = torch.zeros(2, 8, 4, kv_heads, dim, dtype=dtype)
        args = (q, k, v, cos, sin, caches[0], caches[1], slots)
        q_out, k_out = rotary.rotate_and_store(*args) if use_kernel else torch_path(rotary.rotate_and_store, *args)
        results.append((q_out, k_out, caches))
    (q1, k1, c1), (q2, k2, c2) = results
    if dtype == torch.bfloat16:  # every product rounded as PyTorch rounds it: the same bits
        assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(c1, c2)
    for got, want in ((q1, q2), (k1, k2), (c1, c2)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation(dtype, name, torch_path):
    torch.manual_seed(2)
    act = activation.GatedActivation(name)
    gate_up = torch.randn(33, 2 * 160, dtype=dtype) * 4
    torch.testing.assert_close(act(gate_up), torch_path(act, gate_up), **ulps(dtype))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", [(64, 9, 3, 16), (128, 8, 2, 4), (64, 4, 4, 16),
                                                                 (32, 6, 1, 8), (80, 4, 2, 16)])
def test_paged_decode_attention(dtype, head_dim, heads, kv_heads, block_size, torch_path):
    """Contexts from one token to many blocks (partial last blocks), blocks scattered in the cache."""
    torch.manual_seed(3)
    lens = [1, 5, block_size, block_size + 1, 33, 100, 250]
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(lens), max(needed), dtype=torch.long)
    start = 0
    for row, n in enumerate(needed):
        tables[row, :n] = torch.tensor(order[start:start + n])
        start += n
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), [], 0, tables, torch.tensor(lens), block_size)
    layer = attention.PagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    q = torch.randn(len(lens), heads, head_dim, dtype=dtype)
    got = layer._decode(q, k_cache, v_cache, meta)
    want = torch_path(layer._decode, q.float(), k_cache.float(), v_cache.float(), meta)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), want, **tolerance)


@pytest.mark.parametrize("dtype", FUSED)
def test_greedy_argmax_matches_torch(dtype, torch_path):
    """First index of the largest value; ties and NaN (largest) as torch.argmax decides them."""
    torch.manual_seed(4)
    logits = torch.randn(9, 49_157).to(dtype)
    logits[1, 100] = logits[1, 40_000] = 50.0  # a tie: the first wins
    logits[2, 7] = logits[2, 30_000] = float("nan")  # NaN is the maximum, the first one
    logits[3, -1] = 60.0  # in the scalar tail past the last full vector
    logits[4] = float("-inf")
    expected = logits.float().argmax(dim=-1)
    assert torch.equal(sampler.greedy_tokens(logits), expected)
    assert torch.equal(torch_path(sampler.greedy_tokens, logits), expected)
