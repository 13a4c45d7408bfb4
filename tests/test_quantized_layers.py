"""Quantized weights at the layer level: the C++ kernel against the de-quantize-then-F.linear path it stands
beside, GGUF's block types against the gguf package's own de-quantizer, and the int8 / int4 quantizers."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraserve.config import QUANTIZATION_METHODS
from loraserve.layers.cpu_kernels import quant_module
from loraserve.layers.quantized import QuantizedMatmul, QuantizedTensor, _kernel_for
from loraserve.layers.quantizers import quantize_int4, quantize_int8
from loraserve.model.quantization import METHODS
from loraserve.model.quantization.gguf import UNPACKERS


def test_config_lists_every_method():
    assert set(QUANTIZATION_METHODS) == set(METHODS)


def test_kernel_builds_and_serves_bf16_here():
    module = quant_module()
    assert module is not None and module.available  # this machine has AVX512-BF16: the kernel must serve


def _random_weight(rows: int, cols: int, bits: int, group: int, offsets: bool, half: bool, seed: int,
                   perm: bool = False) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (rows, cols), generator=g)
    else:
        q = torch.randint(-128, 128, (rows, cols), generator=g)
    scales = torch.rand(rows, cols // group, generator=g) * 0.02 + 0.001
    if half:
        scales = scales.half().float()
    off = (torch.randn(rows, cols // group, generator=g) * 0.05) if offsets else None
    if off is not None and half:
        off = off.half().float()
    input_perm = torch.randperm(cols, generator=g) if perm else None
    return QuantizedTensor.from_values(q, scales, off, group, signed=bits == 8, input_perm=input_perm)


CASES = [(4, 32, True, True), (4, 128, True, False), (4, 64, False, True), (8, 16, False, False),
         (8, 256, True, True)]


@pytest.mark.parametrize("bits,group,offsets,half", CASES)
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
def test_kernel_matches_dequantized_linear(bits, group, offsets, half, tokens):
    weight = _random_weight(200, 256, bits, group, offsets, half, seed=tokens + bits)
    assert weight.bits == bits and weight.scales.dtype == (torch.float16 if half else torch.float32)
    x = torch.randn(tokens, 256)
    bias = torch.randn(200)
    exact = weight.dequantize(torch.float32)
    scale = x.abs() @ exact.abs().T
    for dtype in (torch.bfloat16, torch.float32):
        assert _kernel_for(x.to(dtype), weight) is not None  # the kernel serves both here, never F.linear
        got = QuantizedMatmul([weight])(x.to(dtype), bias.to(dtype))
        assert got.dtype == dtype
        want = F.linear(x.to(dtype).float(), exact, bias.to(dtype).float())
        if dtype == torch.bfloat16:
            # few tokens: float weights, float sums; more: the weights rounded once to bf16 (as a bf16 copy of
            # the de-quantized weight holds them, at most 2^-9 relative each), float sums; output rounded to bf16
            bound = 2 ** -9 * scale + 2 ** -8 * want.abs() + 1e-3
        else:  # float sums in another order (and offsets through sums of x): float32 rounding, a few ulps of |x||w|
            bound = 2 ** -19 * scale + 1e-6
        assert bool(((got.float() - want).abs() <= bound).all()), (dtype, ((got.float() - want).abs() / bound).max())


def test_act_order_permutation_and_unstackable_parts():
    """Parts sorted by different input permutations cannot share a matmul: each gets its own."""
    a = _random_weight(64, 128, 4, 32, True, True, seed=1, perm=True)
    b = _random_weight(32, 128, 4, 32, True, True, seed=2, perm=True)
    matmul = QuantizedMatmul([a, b])
    assert len(matmul.weights) == 2
    x = torch.randn(5, 128)
    for dtype in (torch.float32, torch.bfloat16):
        want = F.linear(x, torch.cat([a.dequantize(), b.dequantize()]))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=5e-2)
        torch.testing.assert_close(matmul(x.to(dtype)).float(), want, **tol)
    # dequantize puts columns back in input order
    q = a.values().float() * a.scales.float().repeat_interleave(32, 1) + a.offsets.float().repeat_interleave(32, 1)
    assert torch.equal(a.dequantize()[:, a.input_perm], q)


def test_int4_packs_two_per_byte_and_odd_widths_fall_back_to_a_byte():
    packed = QuantizedTensor.from_values(torch.randint(0, 16, (4, 64)), torch.ones(4, 2), None, 32, signed=False)
    assert packed.bits == 4 and packed.data.shape == (4, 32)
    wide = QuantizedTensor.from_values(torch.randint(0, 16, (4, 48)), torch.ones(4, 3), None, 16, signed=False)
    assert wide.bits == 8 and wide.data.shape == (4, 48)
    assert torch.equal(packed.values(), packed.values().clone())
    assert QuantizedMatmul([wide])(torch.randn(2, 48).bfloat16()).shape == (2, 4)


def _round_to_nearest(w: torch.Tensor, group: int, bits: int, symmetric: bool) -> torch.Tensor:
    """The plain method, written independently: symmetric by max |w|, or min..max with an offset."""
    g = w.view(w.shape[0], -1, group)
    if symmetric:
        s = (g.abs().amax(-1, keepdim=True) / 127).half().float()
        return (torch.round(g / s).clamp(-127, 127) * s).view_as(w)
    lo, hi = g.amin(-1, keepdim=True).half().float(), g.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).half().float()
    return (torch.round((g - lo) / s).clamp(0, 2**bits - 1) * s + lo).view_as(w)


@pytest.mark.parametrize("tail", ["gaussian", "student-t3"])
def test_on_the_fly_quantizers_beat_round_to_nearest(tail):
    """Clip search and least-squares refits lower int4's error of plain round-to-nearest at the same group size;
    heavy tails make int4 take smaller groups, where the bytes they cost buy more than they would as bits."""
    torch.manual_seed(0)
    if tail == "gaussian":
        w = torch.randn(256, 512) * 0.05
    else:
        w = torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02
    q8, q4 = quantize_int8(w), quantize_int4(w)
    assert (q4.bits, q8.bits) == (4, 8)
    assert (q4.group_size, q8.group_size) == ((128, 128) if tail == "gaussian" else (64, 64))
    # int8's step is fine enough that clipping rarely pays; never worse (its range is among those searched)
    for q, bits, ratio in ((q8, 8, 1.0), (q4, 4, 0.95)):
        ours = (q.dequantize() - w).pow(2).sum()
        plain = (_round_to_nearest(w, q.group_size, bits, q.offsets is None) - w).pow(2).sum()
        assert ours <= ratio * plain, (bits, float(ours / plain))
    bf16_bytes = w.numel() * 2
    assert q4.nbytes <= 0.30 * bf16_bytes and q8.nbytes <= 0.54 * bf16_bytes


def test_weights_from_a_finer_int4_grid_come_back_exactly():
    """Weights that are an int4 grid of 32 already (a de-quantized Q4_1 GGUF) come back exactly from int4, and
    within float16's rounding of the offset from int8, both in groups of 32: the grid is chosen by error, and
    min..max is among the ranges searched."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (64, 256)).float().view(64, 8, 32)
    q[..., 0], q[..., 1] = 0, 15  # every group spans its grid
    scale = (torch.rand(64, 8, 1) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(64, 8, 1) * 0.05).half().float()
    w = (q * scale + low).view(64, 256)
    fitted = quantize_int4(w)
    assert fitted.group_size == 32 and torch.equal(fitted.dequantize(), w)
    fitted = quantize_int8(w)
    assert fitted.group_size == 32 and fitted.offsets is not None
    assert float((fitted.dequantize() - w).pow(2).sum() / w.pow(2).sum()) < 1e-7


def test_tiny_weights_keep_float32_scales():
    w = torch.randn(32, 128) * 1e-5  # float16 would round steps of 1e-7 to a few bits
    q8 = quantize_int8(w)
    assert q8.scales.dtype == torch.float32
    assert float((q8.dequantize() - w).abs().max()) <= float(w.abs().max()) / 127


def _gguf_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks quantized by the gguf package where it can; else random bytes (every bit pattern is a valid
    K-quant block) with sane float16 scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    except NotImplementedError:
        raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
        half = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
        if kind in ("Q4_K", "Q5_K"):
            raw[..., 0:2], raw[..., 2:4] = half(0.01), half(0.004)
        else:  # Q6_K: d last
            raw[..., -2:] = half(0.003)
        return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(UNPACKERS))
def test_gguf_blocks_match_gguf_dequantize(kind):
    rng = np.random.default_rng(7)
    rows, cols = 12, 512
    raw = _gguf_blocks(kind, rows, cols, rng)
    qtype = gguf.GGMLQuantizationType[kind]
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    got = UNPACKERS[kind](raw.reshape(rows, -1, block_bytes))
    assert np.array_equal(got.dequantize().numpy(), want)  # the same numbers, bit for bit
    x = torch.randn(3, cols).bfloat16()
    exact = torch.from_numpy(want)
    out = x.float() @ exact.T
    bound = 2 ** -9 * (x.float().abs() @ exact.abs().T) + 2 ** -8 * out.abs() + 1e-3
    assert bool(((QuantizedMatmul([got])(x).float() - out).abs() <= bound).all())
