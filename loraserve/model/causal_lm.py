"""What every served model shares, whatever its family: loading checkpoint tensors by their Hugging Face
names into our modules, the embedding table and LM head (possibly quantized), packing weights, counting
them, the paged KV caches, and the names adapters and checkpoints use. A family file (decoder.py,
gpt_bigcode.py) builds the module tree, mirroring Hugging Face's paths so names map onto it, and `forward`."""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear
from loraserve.layers.lora_ops import DoRANorms, SlotLayout, SlotTables, add_embedding_lora, add_lora_per_run
from loraserve.layers.matmul import MatmulWeight
from loraserve.layers.moe import EXPERT_PARTS, FusedExperts
from loraserve.layers.quantized import QuantizedMatmul, QuantizedTensor
from loraserve.layers.quantizers import QUANTIZERS
from loraserve.model.registry import DecoderSpec

# One expert's matrix in a per-expert checkpoint: Mixtral's block_sparse_moe.experts.3.w1, Qwen-MoE's
# mlp.experts.3.gate_proj. Mixtral's block_sparse_moe is transformers' mlp.
_EXPERT_TENSOR = re.compile(rf"(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<part>{'|'.join(EXPERT_PARTS)})\.weight")
_RENAMES = ((".block_sparse_moe.", ".mlp."),)
HEAD_MODULE = "lm_head"  # the output head's module name in every family's checkpoint


class CausalLM(nn.Module):
    """A decoder + LM head. `forward(batch)` returns the logits (in the model's dtype: the sampler widens
    them only when it needs to) for batch.logits_indices only. Subclasses set `embed_tokens` (the token
    embedding module), `embed_name` (its checkpoint tensor) and build the rest."""

    embed_name = "model.embed_tokens.weight"

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.lm_head_matmul: MatmulWeight | QuantizedMatmul | None = None  # set by pack_weights
        # embeddings / LM head a checkpoint ships quantized (GGUF): kept so, never de-quantized whole
        self.quantized: dict[str, QuantizedTensor] = {}
        self.head_row_norms_sq = torch.empty(0)  # ‖head row‖², kept by pack_weights for DoRA on lm_head
        # adapter slots of the vocabulary tables (model/lora_targets.py fills them when LoRA is enabled)
        self.embed_lora: SlotLayout | None = None
        self.head_lora: SlotLayout | None = None
        self.embed_tables = SlotTables()
        self.head_tables = SlotTables()

    def _make_lm_head(self) -> None:
        if not self.spec.tie_word_embeddings:
            self.lm_head = nn.Linear(self.spec.hidden_size, self.spec.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def long_rope_after(self) -> int | None:
        """For longrope models, the length past which a sequence rotates with the long factors; else None."""
        return None

    def lm_head_name(self) -> str:
        return self.embed_name if self.spec.tie_word_embeddings else "lm_head.weight"

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """The token embeddings of the batch, with each adapter's table, trained rows or embedding LoRA on its
        own tokens. Token ids past the base vocabulary (an adapter's added tokens) read its own table."""
        input_ids, lora = batch.input_ids, batch.lora
        base_ids = input_ids
        if lora is not None and (self.embed_tables.tables or self.embed_tables.rows):
            base_ids = input_ids.clamp(max=self.spec.vocab_size - 1)
        table = self.quantized.get(self.embed_name)
        if table is None:
            h = self.embed_tokens(base_ids)
        else:
            h = table.dequantize(torch.float32, rows=base_ids).to(self.embed_tokens.weight.dtype)
        if lora is not None:
            self.embed_tables.lookup(h, input_ids, lora)
            if self.embed_lora is not None and self.embed_lora.in_use:  # summed and scaled in float32, rounded once
                wide = h.float()
                add_embedding_lora(wide, input_ids, self.embed_lora, lora)
                h = wide.to(h.dtype)
        return h

    def logits(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The LM head over the final hidden states of batch.logits_indices, with each adapter's own head,
        trained rows or lm_head LoRA on its rows; softcapped when the model caps its logits (Gemma 2). When an
        adapter of the batch brings added tokens the logits widen to its vocabulary, the columns past a row's
        own vocabulary at -inf, so no other request can sample them."""
        logits = self.lm_head_matmul(h) if self.lm_head_matmul is not None else F.linear(h, self.lm_head_weight())
        lora = batch.logits_lora
        if lora is not None:
            width = self.head_tables.width(lora, logits.shape[1])
            if width > logits.shape[1]:
                logits = F.pad(logits, (0, width - logits.shape[1]), value=float("-inf"))
            self.head_tables.project(logits, h, lora)
            head = self.head_lora
            if head is not None and head.in_use:
                if not head.scaled.isdisjoint(lora.slots_present):
                    logits = logits.float()  # DoRA's scale on logits in bf16 would round them twice more
                add_lora_per_run(logits, h, head, lora)
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def pack_weights(self) -> None:
        """Hand every matmul weight to its fastest form once the weights are final (layers/matmul.py)."""
        for module in self.modules():
            if isinstance(module, Linear | FusedExperts):
                module.pack()
        head = self.quantized.get(self.lm_head_name())
        if head is not None:
            self.head_row_norms_sq = head.dequantize(torch.float32).pow(2).sum(dim=1)
            self.lm_head_matmul = QuantizedMatmul([head])
            return
        self.head_row_norms_sq = self.lm_head_weight().data.float().pow(2).sum(dim=1)
        self.lm_head_matmul = MatmulWeight(self.lm_head_weight().data)
        if not self.spec.tie_word_embeddings and self.lm_head_matmul.dense is None:
            self.lm_head.weight.data = torch.empty(0, dtype=self.lm_head.weight.dtype,
                                                   device=self.lm_head.weight.device)

    def weight_bytes(self) -> int:
        """Bytes of model weights held (quantized weights at their quantized size; the KV cache excluded)."""
        linears = [m for m in self.modules() if isinstance(m, Linear | FusedExperts)]
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

    def dora_norms(self, module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> DoRANorms:
        """‖W₀ + c·B·A‖ per output row in float32 (B scaled), DoRA's norm at any coefficient c (lora.adapter.
        BaseWeights), on the weights as served (de-quantized where quantized); for the embedding table E, W₀ is Eᵀ
        as PEFT's DoRA takes it. ‖W₀ + c·BA‖² = ‖W₀‖² + 2c·Σₖ Bᵢₖ(A W₀ᵀ)ₖᵢ + c²‖Bᵢ A‖². Where a dense W₀ is at
        hand (float32 weights, the embedding table) the norm at c = 1 is formed as PEFT forms it; a weight
        prepacked for oneDNN (bf16) or quantized is not unpacked: A·W₀ᵀ comes from the layer's own matmul."""
        dense = self._dense_weight(module)
        if dense is not None:
            lora = lora_b @ lora_a[:, :dense.shape[1]]
            return DoRANorms(torch.linalg.norm(dense + lora, dim=1), dense.pow(2).sum(dim=1),
                             (dense * lora).sum(dim=1), lora.pow(2).sum(dim=1))
        dtype = self.embed_tokens.weight.dtype
        if module == HEAD_MODULE:
            a_w, row_norms = self.lm_head_matmul(lora_a.to(dtype)).float(), self.head_row_norms_sq
        else:
            linear, part = self.linear_modules()[module]
            cols = linear.part_slice(part)
            a_w, row_norms = linear.matmul(lora_a.to(dtype))[:, cols].float(), linear.row_norms_sq[cols]
        cross = (lora_b * a_w.T).sum(dim=1)
        lora_norms = ((lora_b @ (lora_a @ lora_a.T)) * lora_b).sum(dim=1)
        return DoRANorms.expanded(row_norms, cross, lora_norms)

    def _dense_weight(self, module: str) -> torch.Tensor | None:
        """W₀ [out, in] in float32 when the served form keeps it (or it is the embedding table, which a tied
        head reads too), else None."""
        if module == self.embed_name.removesuffix(".weight"):
            return self.checkpoint_tensor(self.embed_name).T
        if module == HEAD_MODULE and self.spec.tie_word_embeddings:
            return self.checkpoint_tensor(self.embed_name)
        if module == HEAD_MODULE:
            matmul = self.lm_head_matmul
            cols = slice(None)
        else:
            linear, part = self.linear_modules()[module]
            matmul, cols = linear.matmul, linear.part_slice(part)
        if isinstance(matmul, MatmulWeight) and matmul.dense is not None and matmul.dtype == torch.float32:
            return matmul.dense[cols]
        return None

    def checkpoint_tensor(self, name: str) -> torch.Tensor | None:
        """The served value of checkpoint tensor `name` in float32 (de-quantized where quantized); None for an
        LM head whose dense copy the packed matmul dropped."""
        if name == f"{HEAD_MODULE}.weight":
            name = self.lm_head_name()
        if name in self.quantized:
            return self.quantized[name].dequantize(torch.float32)
        module, _, param = name.rpartition(".")
        linears = self.linear_modules()
        if module in linears and param == "bias":
            linear, part = linears[module]
            return linear.bias.data[linear.part_slice(part)].float()
        tensor = dict(self.named_parameters()).get(name)
        return None if tensor is None or tensor.numel() == 0 else tensor.data.float()

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Give every attention module (anything holding a k_cache) its paged K and V caches."""
        dtype = self.embed_tokens.weight.dtype
        shape = (num_blocks, block_size, self.spec.num_kv_heads, self.spec.head_dim)
        for module in self.modules():
            if hasattr(module, "k_cache"):
                module.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
                module.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def linear_modules(self) -> dict[str, tuple[Linear, str]]:
        """Checkpoint module name (e.g. model.layers.0.self_attn.q_proj) -> (packed Linear, part)."""
        found = {}
        for path, module in self.named_modules():
            if isinstance(module, Linear):
                parent = path.rsplit(".", 1)[0]
                for part in module.parts:
                    found[f"{parent}.{part}"] = (module, part)
        return found

    def expert_tensors(self) -> dict[str, tuple[FusedExperts, str]]:
        """Fused expert tensor name (model.layers.0.mlp.experts.gate_up_proj) -> (FusedExperts, tensor), what
        PEFT's target_parameters adapt."""
        return {f"{path}.{name}": (module, name) for path, module in self.named_modules()
                if isinstance(module, FusedExperts) for name in module.TENSORS}

    def checkpoint_names(self) -> set[str]:
        """The tensor names a checkpoint of this model holds (Hugging Face's, q/k/v and gate/up unpacked;
        experts fused, as transformers names them)."""
        linears = self.linear_modules()
        linear_params = {id(p) for linear, _ in linears.values() for p in linear.parameters()}
        names = {f"{name}.{p}" for name, (lin, _) in linears.items() for p in ("weight", "bias")
                 if getattr(lin, p) is not None}
        return names | {name for name, p in self.named_parameters() if id(p) not in linear_params}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], quantize: str | None = None) -> None:
        """Copy checkpoint tensors into the modules; every parameter must be covered exactly once. Quantized
        tensors (QuantizedTensor) stay quantized: linear parts, the embedding table, the LM head. Experts
        arrive fused or one matrix per expert. `quantize` ("int8" / "int4"): each float linear and expert weight
        is quantized as it arrives (from its checkpoint values), so no float copy of the model is ever held;
        embeddings and the LM head stay as they are, as in vLLM's weight-only schemes."""
        linears = self.linear_modules()
        params = dict(self.named_parameters())
        experts = {path: module for path, module in self.named_modules() if isinstance(module, FusedExperts)}
        quantizer = QUANTIZERS[quantize] if quantize is not None else None

        def held(tensor):  # a float matmul weight as the model holds it
            return quantizer(tensor) if quantizer is not None and not isinstance(tensor, QuantizedTensor) else tensor

        expected = self.checkpoint_names()
        loaded = set()
        for name, tensor in weights:
            for old, new in _RENAMES + self.spec.checkpoint_renames:
                name = name.replace(old, new)
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.spec.tie_word_embeddings):
                continue
            if name == "lm_head.weight" and self.spec.normalized_head:
                tensor = _normalized_rows(name, tensor)
            module_name, _, param = name.rpartition(".")
            expert = _EXPERT_TENSOR.fullmatch(name)
            if expert is not None and expert["module"] in experts:
                experts[expert["module"]].load_expert(int(expert["expert"]), expert["part"], held(tensor))
                loaded.update(f"{expert['module']}.{t}" for t in FusedExperts.TENSORS)
                continue
            if module_name in experts and param in FusedExperts.TENSORS:
                if isinstance(tensor, QuantizedTensor):
                    raise ValueError(f"{name}: quantized fused expert tensors are not supported; per-expert ones are")
                experts[module_name].load_fused(param, tensor, quantizer)
            elif isinstance(tensor, QuantizedTensor) and module_name not in linears:
                self._load_quantized_table(name, tensor, params)
            elif module_name in linears:
                linear, part = linears[module_name]
                linear.load_part(part, param, held(tensor) if param == "weight" else tensor)
            elif name in params:
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
            else:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to this architecture")
            loaded.add(name)
        missing = sorted(expected - loaded)
        missing += [f"{path}: {gap}" for path, module in experts.items() for gap in module.missing_experts()]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}")

    def _load_quantized_table(self, name: str, tensor: QuantizedTensor, params: dict) -> None:
        if name not in (self.embed_name, "lm_head.weight") or tensor.input_perm is not None:
            raise ValueError(f"checkpoint tensor {name!r} is quantized; loraserve keeps quantized only linear "
                             f"layers, the embedding table and the LM head")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tensor.shape}, model expects {tuple(params[name].shape)}")
        self.quantized[name] = tensor.to(params[name].device)
        params[name].data = torch.empty(0, dtype=params[name].dtype, device=params[name].device)


def _normalized_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Baichuan2's NormHead: its logits use the LM head's rows L2-normalised (F.normalize, as its checkpoint code
    does once at inference), folded into the weight here, in float32, so the head is a plain one afterwards."""
    if isinstance(tensor, QuantizedTensor):
        raise ValueError(f"{name} is quantized, but this model's LM head normalises its rows (Baichuan2's NormHead), "
                         f"which loraserve folds into a float weight; use a checkpoint with a float LM head")
    return F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
