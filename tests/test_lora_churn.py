"""Slot and host caches under churn with every adapter kind: more adapters than host copies and slots, in
rotating mixed batches. Every request keeps getting the tokens it gets alone; what the slots hold (factor
rows, DoRA and bias output maps, whole tables, trained rows, norm weights) is exactly what their current
adapters put there, nothing of an evicted adapter lingers, the host cache stays within max_cpu_loras, and
once every adapter is removed the slots hold no more than an engine that never saw one."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from test_lora_batching import assert_idle
from test_lora_fidelity import lora_kwargs
from test_lora_kinds import KINDS
from tiny_models import make_sharp_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPT = "churning adapters"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("churn")
    path = make_sharp_tiny_model("qwen2", folder / "model")  # biases on q/k/v, a tied head
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(str(path), dtype="float32", max_model_len=64, num_kv_blocks=96, block_size=4, enable_lora=True,
              max_loras=2, max_cpu_loras=3, max_lora_rank=8)
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    loras = [LoRARequest(f"{kind}-{copy}", 1 + 2 * i + copy,
                         str(make_peft_adapter(hf, folder / f"{kind}-{copy}", seed=10 * i + copy,
                                               **lora_kwargs(case, "qwen2", prompt_ids))))
             for i, (kind, case) in enumerate(KINDS.items()) for copy in range(2)]
    return path, llm, loras


def _held(slots) -> dict[str, set[int]]:
    """Which slots each per-slot structure holds something for."""
    return {
        "output maps": {s for layout in slots.layouts for s in layout.scaled | layout.shifted},
        "tables": {s for table in slots.tables.values() for s in [*table.tables, *table.rows, *table.vocab]},
        "norms": {s for norm in slots.norm_modules for s in norm.slot_params},
        "factor rows": {v // layout.experts for layout in slots.layouts for v, w in enumerate(layout.widths) if w},
    }


def test_churn_every_kind_through_few_slots(setup):
    path, llm, loras = setup
    expected = {lora.lora_name: llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
                for lora in loras}
    assert len({tuple(t) for t in expected.values()}) > len(loras) // 2  # the kinds do generate differently
    manager = llm.engine.lora_manager
    for round_ in range(3):
        order = loras[round_::3] + loras[:round_]  # a different mix each round
        for start in range(0, len(order), 3):
            batch = order[start:start + 3]
            outputs = llm.generate([PROMPT] * len(batch), GREEDY, use_tqdm=False, lora_request=batch)
            for lora, out in zip(batch, outputs, strict=True):
                assert out.outputs[0].token_ids == expected[lora.lora_name], lora.lora_name
            occupied = {slot for slot, owner in enumerate(manager.slots.owner) if owner is not None}
            for what, held in _held(manager.slots).items():
                assert held <= occupied, f"{what} of an evicted adapter linger in slots {held - occupied}"
            assert len(manager.host.cached_ids()) <= 3
    stats = manager.stats()
    assert stats.slots.evictions > len(loras) and stats.host.evictions > 0
    assert_idle(llm)
    for lora in loras:
        llm.remove_lora(lora.lora_int_id)
    fresh = LLM(str(path), dtype="float32", max_model_len=64, num_kv_blocks=96, block_size=4, enable_lora=True,
                max_loras=2, max_cpu_loras=3, max_lora_rank=8)
    manager.stats()  # frees the slots of removed adapters
    assert manager.slots.num_used == 0 and not any(_held(manager.slots).values())
    # what stays allocated is the layouts' fixed factor tables (and the vocabulary tables' lazy ones)
    lazy = sum(layout.lora_a.nbytes + layout.lora_b.nbytes for layout in (llm.engine.model.embed_lora,
                                                                          llm.engine.model.head_lora))
    tables = sum(t.nbytes for layout in manager.slots.layouts for t in (layout.out_scale, layout.out_shift)
                 if t is not None)
    assert manager.slots.nbytes == fresh.engine.lora_manager.slots.nbytes + lazy + tables
