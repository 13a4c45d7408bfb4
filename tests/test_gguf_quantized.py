"""GGUF files served with their weights kept quantized (quantization="gguf"), against transformers loading
the same file (transformers de-quantizes it with the gguf package) — fp32, so the comparison is tight.

- tiny Llama GGUFs written here with the gguf package's own writer and quantizers (K-quant blocks the
  package cannot make are random bytes: every bit pattern is a valid block), every supported block type
  in some tensor, embeddings and LM head quantized too;
- the default model as shipped (Q4_1, with a Q8_0 embedding table that is also its tied LM head), base and
  its trained demo adapters in one mixed batch, against transformers + PEFT.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MixtralForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.layers import quantized
from loraserve.layers.moe import FusedExperts
from loraserve.model.loader import _default_gguf
from test_lora_fidelity import engine_logits

STEPS = 24
TOLERANCE = 1e-4
EXAMPLES = Path(__file__).parent.parent / "examples" / "adapters"
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# (attention, MLP, embedding, LM head) block types of each tiny file: together they cover every type
FILES = {
    "q4_0-q5_1": ("Q4_0", "Q5_1", "Q8_0", "Q6_K"),
    "k-quants": ("Q4_K", "Q5_K", "Q4_1", "Q5_0"),
    "q8_0-f16": ("Q8_0", "F16", "F32", "Q8_0"),
}


def _tensor(kind: str, shape: tuple[int, int], rng: np.random.Generator,
            std: float = 0.2) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype = gguf.GGMLQuantizationType[kind]
    weights = (rng.standard_normal(shape) * std).astype(np.float32)
    if kind in ("F32", "F16"):
        return weights.astype(np.float16 if kind == "F16" else np.float32), qtype
    try:
        return gguf.quants.quantize(weights, qtype), qtype
    except NotImplementedError:  # K-quants: random blocks, scales chosen so weights are ~0.1 around zero
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(shape[0], shape[1] // block_elems, block_bytes), dtype=np.uint8)
        half = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
        if kind == "Q6_K":
            raw[..., -2:] = half(0.0002)
        else:  # minimums cancel the mean of d·sc·q (q averages 7.5 in Q4_K, 15.5 in Q5_K)
            raw[..., 0:2], raw[..., 2:4] = half(0.0004), half(0.0004 * (7.5 if kind == "Q4_K" else 15.5))
        return raw.reshape(shape[0], -1), qtype


def write_tiny_gguf(path: Path, attention: str, mlp: str, embedding: str, head: str, seed: int = 0,
                    arch: str = "llama", experts: int = 0) -> Path:
    """A 2-layer GGUF of `arch` (llama; qwen2: q/k/v biases; phi3: fused attn_qkv, gate and up fused in
    ffn_up; qwen2moe: `experts` routed experts stored fused, ffn_*_exps in the MLP's block type, and a shared
    expert) with the default model's tokenizer (copied field by field) and random weights. `experts` with
    arch llama: Mixtral as llama.cpp writes it."""
    source = gguf.GGUFReader(str(_default_gguf()))
    writer = gguf.GGUFWriter(str(path), arch)
    # transformers reads no expert widths from a Qwen2-MoE GGUF: its config defaults (Qwen1.5-MoE-A2.7B's) apply
    moe_ffn, shared_ffn = (1408, 5632) if arch == "qwen2moe" else (FFN, FFN)

    for key, field in source.fields.items():
        if key.startswith(("GGUF.", "llama.")) or key == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    if arch == "gemma2":
        writer.add_key_length(HIDDEN // HEADS)
        writer.add_value_length(HIDDEN // HEADS)
        writer.add_sliding_window(512)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(moe_ffn)
        writer.add_expert_shared_feed_forward_length(shared_ffn)
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def add(name: str, kind: str, shape: tuple[int, ...], std: float = 0.2) -> None:
        if len(shape) == 1:
            writer.add_tensor(name, (1 + rng.standard_normal(shape) * 0.1).astype(np.float32))
            return
        data, qtype = _tensor(kind, shape, rng, std)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    # Gemma multiplies embeddings by √hidden and reads its head from them: smaller, or every step picks one token
    add("token_embd.weight", embedding, (vocab, HIDDEN), std=0.02 if arch == "gemma2" else 0.2)
    if arch != "gemma2":  # Gemma ties its head to the embedding
        add("output.weight", head, (vocab, HIDDEN))
    add("output_norm.weight", "F32", (HIDDEN,))
    kv = KV_HEADS * head_dim
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", "F32", (HIDDEN,))
        add(f"blk.{i}.ffn_norm.weight", "F32", (HIDDEN,))
        if arch == "phi3":
            add(f"blk.{i}.attn_qkv.weight", attention, (HIDDEN + 2 * kv, HIDDEN))
            add(f"blk.{i}.ffn_up.weight", mlp, (2 * FFN, HIDDEN))
        else:
            add(f"blk.{i}.attn_q.weight", attention, (HIDDEN, HIDDEN))
            add(f"blk.{i}.attn_k.weight", attention, (kv, HIDDEN))
            add(f"blk.{i}.attn_v.weight", attention, (kv, HIDDEN))
        if arch in ("qwen2", "qwen2moe"):
            for proj, width in (("q", HIDDEN), ("k", kv), ("v", kv)):
                add(f"blk.{i}.attn_{proj}.bias", "F32", (width,))
        add(f"blk.{i}.attn_output.weight", attention, (HIDDEN, HIDDEN))
        if arch == "gemma2":  # norms after attention and after the MLP too (stored plus one, as all Gemma norms)
            add(f"blk.{i}.post_attention_norm.weight", "F32", (HIDDEN,))
            add(f"blk.{i}.post_ffw_norm.weight", "F32", (HIDDEN,))
        if experts:
            add(f"blk.{i}.ffn_gate_inp.weight", "F32", (experts, HIDDEN))
            for part, shape in (("gate", (moe_ffn, HIDDEN)), ("up", (moe_ffn, HIDDEN)), ("down", (HIDDEN, moe_ffn))):
                add(f"blk.{i}.ffn_{part}_exps.weight", mlp, (experts, *shape))
            if arch == "qwen2moe":
                add(f"blk.{i}.ffn_gate_inp_shexp.weight", "F32", (HIDDEN,))
                for part, shape in (("gate", (shared_ffn, HIDDEN)), ("up", (shared_ffn, HIDDEN)),
                                    ("down", (HIDDEN, shared_ffn))):
                    add(f"blk.{i}.ffn_{part}_shexp.weight", mlp, shape)
            continue
        if arch != "phi3":
            add(f"blk.{i}.ffn_gate.weight", mlp, (FFN, HIDDEN))
            add(f"blk.{i}.ffn_up.weight", mlp, (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", mlp, (HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def greedy_reference(model, prompt_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=STEPS, min_new_tokens=STEPS, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, torch.stack([step[0].float() for step in out.logits]).log_softmax(-1)


def assert_matches(completion, tokens: list[int], logprobs: torch.Tensor) -> None:
    assert completion.token_ids == tokens
    for step, entries in enumerate(completion.logprobs):
        for token_id, logprob in entries.items():
            assert abs(logprob.logprob - logprobs[step, token_id].item()) < TOLERANCE, (step, token_id)


@pytest.mark.parametrize("name, arch, experts", [*((name, "llama", 0) for name in FILES), ("k-quants", "qwen2", 0),
                                                 ("q4_0-q5_1", "phi3", 0), ("q4_0-q5_1", "qwen2moe", 4),
                                                 ("q4_0-q5_1", "gemma2", 0)])
def test_tiny_gguf_matches_transformers(name, arch, experts, tmp_path):
    """Every block type, and the non-Llama name maps (gguf's tensor names, transformers' processors) on files
    the gguf package writes, kept quantized (fused routed experts split per expert), against transformers
    loading the same file."""
    path = write_tiny_gguf(tmp_path / f"{name}.gguf", *FILES[name], arch=arch, experts=experts)
    llm = LLM(str(path), quantization="gguf", dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=8)
    model = llm.engine.model
    quantized_kinds = {type(m.matmul).__name__ for m in model.modules() if hasattr(m, "matmul")}
    assert "QuantizedMatmul" in quantized_kinds or FILES[name][0] == "F16"
    assert ("model.embed_tokens.weight" in model.quantized) == (FILES[name][2] not in ("F32", "F16"))
    routed = [m for m in model.modules() if isinstance(m, FusedExperts)]
    assert len(routed) == (LAYERS if experts else 0) and all(m.matmuls and not m.down_proj.numel() for m in routed)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in ("Quantized weights", "A GGUF file keeps its blocks, and")]
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, ignore_eos=True, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens, logprobs = greedy_reference(reference, prompt)
        assert len(set(tokens)) > 3  # not one token repeated: positions and weights matter
        assert_matches(output.outputs[0], tokens, logprobs)


def mixtral_reference(path: Path, config) -> nn.Module:
    """transformers' Mixtral on the GGUF's tensors de-quantized by the gguf package (transformers reads no
    Mixtral GGUF): named by gguf's own name map, q/k rows put back by transformers' Llama tensor processor,
    each expert stack assembled as transformers fuses it ([gate | up] rows per expert)."""
    model = MixtralForCausalLM(config).float().eval()
    reader = gguf.GGUFReader(str(path))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    processor = LlamaTensorProcessor(config=config.to_dict())
    values = {t.name: gguf.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
              for t in reader.tensors}
    state = {}
    for name in model.state_dict():
        module, _, suffix = name.rpartition(".")
        if module.endswith(".experts"):
            parts = ("gate_proj", "up_proj") if suffix == "gate_up_proj" else ("down_proj",)
            stacked = [values[f"{name_map.get_name(f'{module}.{part}')}.weight"] for part in parts]
            state[name] = torch.from_numpy(np.concatenate(stacked, axis=1).astype(np.float32))
        else:
            gguf_name = f"{name_map.get_name(module)}.{suffix}"
            state[name] = torch.from_numpy(np.array(processor.process(values[gguf_name], gguf_name).weights))
    model.load_state_dict(state, strict=True)
    return model


def test_mixtral_gguf_keeps_its_experts_quantized(tmp_path):
    """llama.cpp writes Mixtral as arch llama with llama.expert_count and fused ffn_*_exps; transformers would
    read a dense Llama and drop the experts. Served as Mixtral, experts quantized, against transformers'
    Mixtral on the gguf package's de-quantization of the same file."""
    # seed 1: with seed 0 the tokens are identical too, but one top-3 logprob of 48 steps differs by 1.07e-4
    # (this model's logits are large; fp32 summation order), just past the 1e-4 bar
    path = write_tiny_gguf(tmp_path / "mixtral.gguf", *FILES["q4_0-q5_1"], seed=1, experts=4)
    llm = LLM(str(path), quantization="gguf", dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=8)
    routed = [m for m in llm.engine.model.modules() if isinstance(m, FusedExperts)]
    assert len(routed) == LAYERS and all(m.matmuls for m in routed)
    reference = mixtral_reference(path, AutoConfig.from_pretrained(llm.engine.model_path))
    prompts = [llm.get_tokenizer().encode(p) for p in ("Routed experts", "A mixture of experts, kept in blocks")]
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, ignore_eos=True, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens, logprobs = greedy_reference(reference, prompt)
        assert len(set(tokens)) > 3
        assert_matches(output.outputs[0], tokens, logprobs)
    with pytest.raises(ValueError, match="Mixtral-style GGUF"):  # de-quantized by transformers it would be wrong
        LLM(str(path), dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=8)


def test_tiny_gguf_bf16_kernel_is_no_worse_than_pytorch_bf16(tmp_path, monkeypatch):
    """bf16 runs the C++ kernel; against the exact fp32 path it must drift no more than PyTorch's own bf16
    path (de-quantize to bf16, F.linear) does."""
    path = write_tiny_gguf(tmp_path / "k.gguf", *FILES["k-quants"])
    prompt = list(range(100, 164))

    def logprobs(dtype: str) -> torch.Tensor:
        llm = LLM(str(path), quantization="gguf", dtype=dtype, max_model_len=128, num_kv_blocks=64, block_size=8,
                  enable_lora=True)
        return engine_logits(llm, {"row": prompt}, {})["row"].float().log_softmax(-1)

    exact, kernel = logprobs("float32"), logprobs("bfloat16")
    monkeypatch.setattr(quantized, "_kernel_for", lambda x, w: None)
    plain = logprobs("bfloat16")
    top = exact.topk(5, dim=-1).indices
    drift = {name: (lp.gather(1, top) - exact.gather(1, top)).abs().mean().item()
             for name, lp in (("kernel", kernel), ("pytorch", plain))}
    assert drift["kernel"] < 1.5 * drift["pytorch"], drift
    assert (kernel.argmax(-1) == exact.argmax(-1)).float().mean() > 0.85


def test_default_model_as_q4_1_with_trained_adapters(default_model_path):
    """The shipped Q4_1 file kept quantized, base + both demo adapters in one batch, against transformers +
    PEFT on the same file de-quantized (the default model's converted folder is transformers' own load of
    that GGUF, saved)."""
    llm = LLM(quantization="gguf", dtype="float32", enable_lora=True, max_loras=2, max_model_len=256,
              num_kv_blocks=64)
    engine = llm.engine
    assert engine.quantization == "gguf"
    # nothing de-quantized: the weights take what the file takes (~0.36x of bf16)
    assert engine.weight_bytes <= _default_gguf().stat().st_size
    tokenizer = llm.get_tokenizer()
    prompts = {
        "base": "What is the capital of France?",
        "uppercase": "Tell me about the moon.",
        "json": "Give me a person named Ada who is 36.",
    }
    chat = {row: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False) for row, text in prompts.items()}
    ids = {row: tokenizer.encode(text, add_special_tokens=False) for row, text in chat.items()}
    loras = {name: LoRARequest(name, i, str(EXAMPLES / name)) for i, name in enumerate(("uppercase", "json"), 1)}
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, ignore_eos=True, logprobs=2)
    rows = list(prompts)
    outputs = llm.generate([{"prompt_token_ids": ids[r]} for r in rows], params, use_tqdm=False,
                           lora_request=[loras.get(r) for r in rows])
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    tokens, logprobs = greedy_reference(hf, ids["base"])
    assert_matches(outputs[0].outputs[0], tokens, logprobs)
    peft_model = PeftModel.from_pretrained(hf, loras["uppercase"].lora_path, adapter_name="uppercase").eval()
    peft_model.load_adapter(loras["json"].lora_path, adapter_name="json")
    for row, output in zip(rows[1:], outputs[1:], strict=True):
        peft_model.set_adapter(row)
        tokens, logprobs = greedy_reference(peft_model, ids[row])
        assert_matches(output.outputs[0], tokens, logprobs)
    assert outputs[1].outputs[0].text.upper() == outputs[1].outputs[0].text  # the adapter is really at work


def test_dora_on_the_quantized_default_model_uses_its_dequantized_weights(default_model_path, tmp_path):
    """DoRA's norm ‖W₀ + scale·BA‖ on a base kept quantized (Q4_1, no dense weight anywhere) is taken on the
    de-quantized weights, as PEFT takes it on transformers' de-quantized load of the same file: greedy tokens
    and full logits within 1e-4 (fp32), beside a base request."""
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    path = make_peft_adapter(hf, tmp_path / "dora", seed=6, noise=0.25, r=8, lora_alpha=2, use_dora=True,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])
    lora = LoRARequest("dora", 1, str(path))
    llm = LLM(quantization="gguf", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8,
              max_model_len=256, num_kv_blocks=64)
    ids = llm.get_tokenizer().encode("Quantized bases keep DoRA exact")
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, ignore_eos=True, logprobs=2)
    base, dora = llm.generate([{"prompt_token_ids": ids}] * 2, params, use_tqdm=False, lora_request=[None, lora])
    peft_model = PeftModel.from_pretrained(hf, str(path)).eval()
    tokens, logprobs = greedy_reference(peft_model, ids)
    assert_matches(dora.outputs[0], tokens, logprobs)
    assert tokens != list(base.outputs[0].token_ids)
    with torch.no_grad():
        reference = peft_model(input_ids=torch.tensor([ids + tokens])).logits[0]
    ours = engine_logits(llm, {"dora": ids + tokens}, {"dora": lora})["dora"]
    assert (ours - reference).abs().max().item() < 1e-4
