"""Phi-3 longrope against transformers on the same weights (float32): a sequence rotates with the short
factors until it is longer than original_max_position_embeddings, then with the long ones, as transformers
does (a prompt already longer is rotated long throughout; a shorter one switches while it generates), in
batches mixing both kinds, with chunked prefill, and with prefix caching, whose keys tell the two apart."""
from __future__ import annotations

import pytest
import torch
import transformers

from loraserve import LLM, SamplingParams
from tiny_models import make_sharp_tiny_model

ORIGINAL = 24  # original_max_position_embeddings: prompts below cross it while generating, above start past it
NEW_TOKENS = 32
HALF = 8  # head_dim 16 / 2 factors
ROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=ORIGINAL,
            short_factor=[1.0 + 0.1 * i for i in range(HALF)], long_factor=[2.0 + 1.5 * i for i in range(HALF)])
SHORT = "Hello world"  # 11 tokens: switches at position 24, while generating
LONG = SHORT + ", this prompt is longer than 24"  # 42 tokens: long from the start; shares SHORT's first blocks
LONGER = LONG + " and then some"  # shares LONG's blocks: the prefix cache may serve it


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_sharp_tiny_model("phi3", tmp_path_factory.mktemp("longrope"), rope_parameters=ROPE,
                                 original_max_position_embeddings=ORIGINAL, max_position_embeddings=128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "longrope"
    return path, hf


def reference(hf, token_ids: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and each one's log-probability."""
    out = hf.generate(torch.tensor([token_ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(token_ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def test_longrope_switch_matches_transformers(model):
    path, hf = model
    llm = LLM(str(path), dtype="float32", max_model_len=128, num_kv_blocks=128, block_size=4,
              max_num_batched_tokens=16)  # chunks the long prompts
    tokenizer = llm.get_tokenizer()
    prompts = [SHORT, LONG, LONGER]
    ids = [tokenizer.encode(p) for p in prompts]
    assert len(ids[0]) < ORIGINAL < len(ids[0]) + NEW_TOKENS and len(ids[1]) > ORIGINAL
    expected = [reference(hf, i) for i in ids]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0)  # as HF

    def check(outputs) -> None:
        for output, (tokens, logprobs) in zip(outputs, expected, strict=True):
            completion = output.outputs[0]
            assert completion.token_ids == tokens
            got = [entry[t].logprob for entry, t in zip(completion.logprobs, tokens, strict=True)]
            assert max(abs(a - b) for a, b in zip(got, logprobs, strict=True)) < 1e-4

    # alone, in turn: SHORT's blocks are cached first; LONG begins with the same tokens but rotated long, so it
    # must not reuse them (it would then differ from transformers); LONGER may reuse LONG's
    blocks = llm.engine.blocks
    check([llm.generate([p], params, use_tqdm=False)[0] for p in prompts])
    assert _keys(llm, ids[1][:20], ORIGINAL).isdisjoint(_keys(llm, ids[1][:20], 0))
    hits = blocks.hit_tokens
    check(llm.generate(prompts, params, use_tqdm=False))  # one batch mixing both tables
    assert blocks.hit_tokens > hits  # each prompt met its own earlier KV again


def _keys(llm: LLM, token_ids: list[int], long_rope_from: int) -> set[bytes]:
    """The prefix-cache keys of `token_ids`' full blocks for a sequence switching at `long_rope_from`."""
    from loraserve.engine.sequence import Sequence

    seq = Sequence(0, "probe", 0, len(token_ids), list(token_ids), SamplingParams(), long_rope_from=long_rope_from)
    blocks, keys = llm.engine.blocks, []
    for index in range(len(token_ids) // blocks.block_size):
        keys.append(blocks._key(seq, index, keys[-1] if keys else b""))
    return set(keys)
