"""What an adapter brings whole rather than as factors: tensors saved entire (modules_to_save, trained biases,
vocabulary tables resized for added tokens, save_embedding_layers' copies), trained token rows
(trainable_token_indices), and the tokenizer saved beside it; checked against the model and the limits
(--lora-extra-vocab-size, --max-lora-saved-mb), minus what equals the base's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from loraserve.errors import LoRAError
from loraserve.layers.lora_ops import DoRANorms
from loraserve.lora.peft_config import CONFIG_FILE, AdapterConfig, LoRATargetSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a tokenizer saved beside the adapter


class BaseWeights(Protocol):
    """What reading an adapter needs from the base model's weights (the CausalLM provides it)."""

    def dora_norms(self, module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> DoRANorms:
        """‖W₀ + c·B·A‖ per output row in float32 for the module's served weight W₀ [out, in] (B scaled), at any
        coefficient c; for an embedding table E [vocab, dim] W₀ is Eᵀ, as PEFT's DoRA takes it."""

    def checkpoint_tensor(self, name: str) -> torch.Tensor | None:
        """The base's tensor `name` (a key of LoRATargetSpec.tensors) in float32, None if not at hand."""


@dataclass
class TokenRows:
    """trainable_token_indices: rows `ids` of an embedding table take the values `rows` [n, dim]."""

    ids: torch.Tensor  # int64
    rows: torch.Tensor


def whole_copies(whole: dict[str, torch.Tensor], token_rows: dict[str, TokenRows], config: AdapterConfig,
                 spec: LoRATargetSpec, selected: list[str], name: str, base: BaseWeights | None,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, TokenRows]]:
    """The saved tensors and token rows an adapter is served with, in `dtype`, within the budget."""
    saved, new_rows = _saved_tensors(whole, config, spec, selected, name, base, dtype)
    for table, rows in new_rows.items():  # trained rows (token_rows) win over a resized table's new rows
        token_rows[table] = _merge_rows(rows, token_rows[table]) if table in token_rows else rows
    token_rows = {table: TokenRows(rows.ids, rows.rows.to(dtype)) for table, rows in token_rows.items()}
    saved = {key: tensor.to(dtype) for key, tensor in saved.items()}
    whole_bytes = sum(t.nbytes for t in saved.values()) + sum(r.rows.nbytes for r in token_rows.values())
    if whole_bytes > spec.max_saved_bytes:
        raise LoRAError(f"adapter {name!r} brings {whole_bytes / 2**20:.1f} MiB of whole copies (modules_to_save: "
                        f"{', '.join(saved) or 'none'}; token rows), more than one adapter may hold here "
                        f"(--max-lora-saved-mb {spec.max_saved_bytes / 2**20:g}); raise it (each slot and host copy "
                        f"may then hold that much), or re-train with LoRA on those modules instead of saving them")
    for table in config.trainable_token_indices:
        if not any(_is_table(t, table, spec) for t in token_rows):
            raise LoRAError(f"adapter {name!r}: its {CONFIG_FILE} trains token rows of {table or 'the embedding'!r} "
                            f"(trainable_token_indices) but its weights file holds none; re-save the adapter")
    return saved, token_rows


def vocabulary_rows(spec: LoRATargetSpec, modules: dict[str, Any], saved: dict[str, torch.Tensor],
                    token_rows: dict[str, TokenRows]) -> int:
    """How many vocabulary rows the adapter's tables reach (the base's when it adds no token)."""
    sizes = [spec.modules[spec.head][1] if spec.head else 0]
    sizes += [t.shape[0] for key, t in saved.items() if key.removesuffix(".weight") in (*spec.embeddings, spec.head)]
    sizes += [w.lora_a.shape[1] for m, w in modules.items() if m in spec.embeddings]
    sizes += [w.lora_b.shape[0] for m, w in modules.items() if m == spec.head]
    sizes += [int(rows.ids.max()) + 1 for rows in token_rows.values()]
    return max(sizes)


def trained_token_rows(module: str, values: torch.Tensor, config: AdapterConfig, spec: LoRATargetSpec,
                       name: str) -> tuple[str, TokenRows]:
    """The trainable-token rows of vocabulary table `module` (the embedding, or the LM head PEFT trains
    alongside it), checked against trainable_token_indices."""
    tables = {**spec.embeddings, **({spec.head: spec.modules[spec.head][::-1]} if spec.head else {})}
    if module not in tables:
        raise LoRAError(f"adapter {name!r} trains token rows of {module!r}, which is not a vocabulary table of model "
                        f"{spec.model_name!r} (its tables: {', '.join(tables)})")
    ids = next((v for k, v in config.trainable_token_indices.items() if _is_table(f"{module}.weight", k, spec)), None)
    if ids is None:
        raise LoRAError(f"adapter {name!r} holds trained token rows for {module!r}, which its {CONFIG_FILE} does not "
                        f"name in trainable_token_indices; the config and the weights do not belong together")
    vocab, dim = tables[module]
    if values.shape != (len(ids), dim):
        raise LoRAError(f"adapter {name!r}: the trained token rows of {module!r} have shape "
                        f"{tuple(values.shape)}, expected ({len(ids)}, {dim}) for the {len(ids)} ids of "
                        f"trainable_token_indices; re-save the adapter")
    check_vocabulary(max(ids) + 1, vocab, spec, name, f"trainable_token_indices of {module!r}")
    return f"{module}.weight", TokenRows(torch.tensor(ids, dtype=torch.long), values.float())


def _is_table(table: str, entry: str | None, spec: LoRATargetSpec) -> bool:
    """Whether a trainable_token_indices key names vocabulary table `table` (None: the input embedding, and
    the LM head PEFT trains with it)."""
    module = table.removesuffix(".weight")
    if entry is None:
        return module in (next(iter(spec.embeddings), None), spec.head)
    return module == entry or module.endswith("." + entry)


def _merge_rows(first: TokenRows | None, then: TokenRows) -> TokenRows:
    """Rows of one table from two sources, the later winning where both set a row."""
    if first is None:
        return then
    rows = dict(zip(first.ids.tolist(), first.rows, strict=True)) | dict(zip(then.ids.tolist(), then.rows,
                                                                             strict=True))
    return TokenRows(torch.tensor(list(rows), dtype=torch.long), torch.stack(list(rows.values())))


def check_vocabulary(rows: int, vocab: int, spec: LoRATargetSpec, name: str, what: str) -> None:
    if rows > vocab + spec.extra_vocab_size:
        raise LoRAError(f"adapter {name!r}: {what} reaches {rows} vocabulary rows, the base has {vocab} and "
                        f"--lora-extra-vocab-size allows {spec.extra_vocab_size} more; restart with "
                        f"--lora-extra-vocab-size {rows - vocab}")


def _saved_tensors(whole: dict[str, torch.Tensor], config: AdapterConfig, spec: LoRATargetSpec,
                   selected: list[str], name: str, base: BaseWeights | None,
                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, TokenRows]]:
    """The tensors saved whole, each justified by the config and servable per adapter, minus those equal to
    the base's (an unchanged copy costs memory and changes nothing); a resized vocabulary table whose old rows
    are the base's comes back as its new rows only."""
    saved, new_rows = {}, {}
    for key, tensor in whole.items():
        module, _, param = key.rpartition(".")
        by_modules_to_save = any(module.endswith(m) for m in config.modules_to_save)  # PEFT's plain suffix match
        by_bias = param == "bias" and (config.bias == "all" or (config.bias == "lora_only" and module in selected))
        if not (by_modules_to_save or by_bias or module in spec.embeddings or module == spec.head):
            raise LoRAError(
                f"adapter {name!r} holds tensor {key!r}, which is not a LoRA weight, and its {CONFIG_FILE} neither "
                f"saves that module (modules_to_save={config.modules_to_save!r}) nor trains biases (bias="
                f"{config.bias!r}); the config and the weights do not belong together"
            )
        expected = spec.tensors.get(key)
        if expected is None:
            raise LoRAError(f"adapter {name!r} saves tensor {key!r}, which model {spec.model_name!r} does not have; "
                            f"the adapter was likely trained for another base model (base_model_name_or_path="
                            f"{config.base_model_name!r})")
        if key not in spec.replaceable:
            raise LoRAError(f"adapter {name!r} saves {key!r} whole (modules_to_save); loraserve serves whole copies "
                            f"of embedding tables, the LM head, norms and biases only; re-train with LoRA on that "
                            f"module instead, or merge the adapter into the base model (loraserve merge)")
        resizable = module in spec.embeddings or module == spec.head
        if tuple(tensor.shape) != expected and not (resizable and tensor.shape[1:] == expected[1:]):
            raise LoRAError(f"adapter {name!r}: its saved {key!r} has shape {tuple(tensor.shape)}, model "
                            f"{spec.model_name!r} expects {expected}; the adapter was likely trained for another "
                            f"base model (base_model_name_or_path={config.base_model_name!r})")
        if resizable:
            check_vocabulary(tensor.shape[0], expected[0], spec, name, f"its saved {key!r}")
        served = base.checkpoint_tensor(key) if base is not None else None
        # compared as served: a float32 copy of a bf16 base's table equals it once rounded to bf16
        if served is not None and torch.equal(tensor[:expected[0]].to(dtype).float(), served):
            if tensor.shape[0] > expected[0]:
                new_rows[key] = TokenRows(torch.arange(expected[0], tensor.shape[0]), tensor[expected[0]:].float())
            continue
        saved[key] = tensor.float()
    return saved, new_rows


def adapter_tokenizer(folder: Path, name: str, vocab: int | None = None) -> Any:
    """The tokenizer saved in the adapter's folder (a fine-tune that added tokens saves it there), or None.
    Its ids must stay within the `vocab` rows the adapter's tables have (checked when given)."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise LoRAError(f"adapter {name!r}: the tokenizer saved in {folder} cannot be read ({e}); re-save it with "
                        f"tokenizer.save_pretrained") from e
    if vocab is not None and len(tokenizer) > vocab:
        raise LoRAError(f"adapter {name!r}: its tokenizer has {len(tokenizer)} tokens but the model with the "
                        f"adapter's tables has {vocab} vocabulary rows; save the embedding table and LM head the "
                        f"added tokens were trained into (modules_to_save=['embed_tokens', 'lm_head'], or "
                        f"trainable_token_indices)")
    return tokenizer
