"""The Llama-family decoder, driven by a DecoderSpec: Llama (SmolLM2, Llama-3), Mistral, Qwen2, Qwen3,
Gemma and Phi-3 differ only in flags of the spec. Module paths mirror Hugging Face's so checkpoint names
map onto them; q/k/v and gate/up are packed into one matmul each."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from loraserve.layers.activation import GatedActivation
from loraserve.layers.attention import PagedAttention
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear
from loraserve.layers.matmul import MatmulWeight
from loraserve.layers.norm import RMSNorm
from loraserve.layers.quantized import QuantizedMatmul, QuantizedTensor
from loraserve.layers.rotary import RotaryEmbedding, rotate_and_store
from loraserve.model.registry import DecoderSpec


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        parts = {"qkv_proj": q + 2 * kv} if spec.packed_checkpoint else {"q_proj": q, "k_proj": kv, "v_proj": kv}
        self.qkv_proj = Linear(spec.hidden_size, parts, bias=spec.qkv_bias)
        self.o_proj = Linear(q, {"o_proj": spec.hidden_size}, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.attn = PagedAttention(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_scale)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x, batch.lora)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_and_store(q, k, v, cos, sin, self.k_cache, self.v_cache, batch.attention.slot_mapping)
        out = self.attn(q, k, v, self.k_cache, self.v_cache, batch.attention)
        return self.o_proj(out, batch.lora)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        size = spec.intermediate_size
        parts = {"gate_up_proj": 2 * size} if spec.packed_checkpoint else {"gate_proj": size, "up_proj": size}
        self.gate_up_proj = Linear(spec.hidden_size, parts, bias=spec.mlp_bias)
        self.down_proj = Linear(size, {"down_proj": spec.hidden_size}, bias=spec.mlp_bias)
        self.act = GatedActivation(spec.activation)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x, batch.lora)), batch.lora)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at the first layer); residual: the stream it
        is added to (None at the first layer). Returns this layer's MLP output and the stream, so each add
        is fused with the norm after it; the sums are the ones `x + attn(norm(x))` ... computes."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, cos, sin, batch), residual)
        return self.mlp(h, batch), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)


class CausalLM(nn.Module):
    """Decoder + LM head. `forward(batch)` returns the logits (in the model's dtype: the sampler widens them
    only when it needs to) for batch.logits_indices only."""

    def __init__(self, spec: DecoderSpec, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.rotary = RotaryEmbedding(config, spec.head_dim, max_positions)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
        self.lm_head_matmul: MatmulWeight | QuantizedMatmul | None = None  # set by pack_weights
        # embeddings / LM head a checkpoint ships quantized (GGUF): kept so, never de-quantized whole
        self.quantized: dict[str, QuantizedTensor] = {}

    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.quantized.get("model.embed_tokens.weight")
        if table is None:
            return self.model.embed_tokens(input_ids)
        return table.dequantize(torch.float32, rows=input_ids).to(self.model.norm.weight.dtype)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed(batch.input_ids)
        if self.spec.embed_scale is not None:
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
        cos, sin = self.rotary.lookup(batch.positions, h.dtype)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, cos, sin, batch)
        rows = batch.logits_indices
        h, _ = self.model.norm.add_and_norm(h[rows], residual[rows])
        if self.lm_head_matmul is not None:
            return self.lm_head_matmul(h)
        return F.linear(h, self.lm_head_weight())

    def quantize_linears(self, method: str) -> None:
        """Quantize every Linear's loaded float weight (quantization="int8" / "int4"); embeddings and the LM
        head stay as they are, as in vLLM's weight-only schemes."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.quantize(method)

    def pack_weights(self) -> None:
        """Hand every matmul weight to its fastest form once the weights are final (layers/matmul.py)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        head = self.quantized.get(self.lm_head_name())
        if head is not None:
            self.lm_head_matmul = QuantizedMatmul([head])
            return
        self.lm_head_matmul = MatmulWeight(self.lm_head_weight().data)
        if not self.spec.tie_word_embeddings and self.lm_head_matmul.dense is None:
            self.lm_head.weight.data = torch.empty(0, dtype=self.lm_head.weight.dtype,
                                                   device=self.lm_head.weight.device)

    def weight_bytes(self) -> int:
        """Bytes of model weights held (quantized weights at their quantized size; the KV cache excluded)."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        counted = {id(p) for m in linears for p in m.parameters()}
        if not self.spec.tie_word_embeddings:
            counted.add(id(self.lm_head.weight))  # held by lm_head_matmul
        total = sum(m.nbytes for m in linears) + sum(t.nbytes for t in self.quantized.values())
        total += sum(p.numel() * p.element_size() for p in self.parameters() if id(p) not in counted)
        head = self.lm_head_matmul
        if isinstance(head, MatmulWeight):  # a quantized head is one of self.quantized
            shared = head.dense is not None and self.spec.tie_word_embeddings  # the embedding table itself
            total += head.nbytes - (head.dense.numel() * head.dense.element_size() if shared else 0)
        return total

    def _load_quantized_table(self, name: str, tensor: QuantizedTensor, params: dict) -> None:
        if name not in ("model.embed_tokens.weight", "lm_head.weight") or tensor.input_perm is not None:
            raise ValueError(f"checkpoint tensor {name!r} is quantized; loraserve keeps quantized only linear "
                             f"layers, the embedding table and the LM head")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tensor.shape}, model expects {tuple(params[name].shape)}")
        self.quantized[name] = tensor.to(params[name].device)
        params[name].data = torch.empty(0, dtype=params[name].dtype, device=params[name].device)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        dtype, device = self.model.embed_tokens.weight.dtype, self.model.embed_tokens.weight.device
        shape = (num_blocks, block_size, self.spec.num_kv_heads, self.spec.head_dim)
        for layer in self.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def linear_modules(self) -> dict[str, tuple[Linear, str]]:
        """Checkpoint module name (e.g. model.layers.0.self_attn.q_proj) -> (packed Linear, part)."""
        found = {}
        for path, module in self.named_modules():
            if isinstance(module, Linear):
                parent = path.rsplit(".", 1)[0]
                for part in module.parts:
                    found[f"{parent}.{part}"] = (module, part)
        return found

    def checkpoint_names(self) -> set[str]:
        """The tensor names a checkpoint of this model holds (Hugging Face's, q/k/v and gate/up unpacked)."""
        linears = self.linear_modules()
        linear_params = {id(p) for linear, _ in linears.values() for p in linear.parameters()}
        names = {f"{name}.{p}" for name, (lin, _) in linears.items() for p in ("weight", "bias")
                 if getattr(lin, p) is not None}
        return names | {name for name, p in self.named_parameters() if id(p) not in linear_params}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the modules; every parameter must be covered exactly once. Quantized
        tensors (QuantizedTensor) stay quantized: linear parts, the embedding table, the LM head."""
        linears = self.linear_modules()
        params = dict(self.named_parameters())
        expected = self.checkpoint_names()
        loaded = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.spec.tie_word_embeddings):
                continue
            module_name, _, param = name.rpartition(".")
            if isinstance(tensor, QuantizedTensor) and module_name not in linears:
                self._load_quantized_table(name, tensor, params)
            elif module_name in linears:
                linear, part = linears[module_name]
                linear.load_part(part, param, tensor)
            elif name in params:
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
            else:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to this architecture")
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
