"""Where adapters may be read from (AdapterSources: roots, hub cache, pickles) and what reading them may cost
(file size limits checked before reading, safetensors headers, non-finite values), each refusal by its rule."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

from lora_fixtures import make_peft_adapter, target_spec, tiny_llama
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.errors import AdapterNotFoundError, AdapterSourceError, LoRAError
from loraserve.lora.adapter import load_adapter
from loraserve.lora.adapter_files import SAFETENSORS_FILE, read_adapter_files
from loraserve.lora.sources import AdapterSources
from tiny_models import make_tiny_model

QV = ["q_proj", "v_proj"]
OUTSIDE = "is outside the folders this server loads adapters from"
LEADS_OUT = "in its folder is a symlink that leads outside the folders this server loads adapters from"
PICKLE = "a pickle can run code when it is read; convert it to safetensors"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory) -> Path:
    """A saved adapter, copied into each test's folders by `place`."""
    return make_peft_adapter(llama, tmp_path_factory.mktemp("adapter"), r=4, target_modules=QV)


def place(adapter: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in adapter.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture
def layout(adapter, tmp_path) -> tuple[Path, Path]:
    """(root, outside): an adapter at root/a, another at outside/a."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    place(adapter, root / "a")
    place(adapter, outside / "a")
    return root, outside


# ---- roots --------------------------------------------------------------------------------------------


def test_folder_inside_a_root_is_accepted_as_its_resolved_path(layout, monkeypatch):
    root, _ = layout
    sources = AdapterSources(roots=(root,))
    expected = str((root / "a").resolve())
    assert sources.check(str(root / "a"), runtime=True) == expected
    assert sources.check(str(root / "x" / ".." / "a") + "/", runtime=True) == expected
    monkeypatch.chdir(root)  # a relative path is taken from the working directory
    assert sources.check("a", runtime=True) == expected
    assert sources.check("./a", runtime=True) == expected


def test_dotdot_traversal_out_of_the_root_is_refused(layout, monkeypatch):
    root, _ = layout
    sources = AdapterSources(roots=(root,))
    with pytest.raises(AdapterSourceError, match=re.escape(OUTSIDE) + r".*--lora-roots DIR"):
        sources.check(str(root / ".." / "outside" / "a"), runtime=True)
    monkeypatch.chdir(root)
    with pytest.raises(AdapterSourceError, match=OUTSIDE):
        sources.check("../outside/a", runtime=True)


def test_absolute_path_outside_the_roots_is_refused_alike_whether_it_exists_or_not(layout):
    root, outside = layout
    sources = AdapterSources(roots=(root,))
    messages = []
    for path in (outside / "a", outside / "b"):  # outside/b does not exist
        with pytest.raises(AdapterSourceError, match=OUTSIDE) as refused:
            sources.check(str(path), runtime=True)
        messages.append(str(refused.value).replace(str(path), "PATH"))
    assert messages[0] == messages[1]
    assert str(root.resolve()) in messages[0]  # names the roots the operator allowed


def test_symlinked_folder_leading_out_of_the_root_is_refused(layout):
    root, outside = layout
    (root / "link").symlink_to(outside / "a", target_is_directory=True)
    with pytest.raises(AdapterSourceError, match=OUTSIDE):
        AdapterSources(roots=(root,)).check(str(root / "link"), runtime=True)


@pytest.mark.parametrize("entry", ["tokenizer.json", SAFETENSORS_FILE])
def test_symlinked_file_inside_an_allowed_folder_leading_out_is_refused(layout, entry):
    root, outside = layout
    target = outside / "a" / SAFETENSORS_FILE if entry == SAFETENSORS_FILE else outside / "secret"
    (root / "a" / entry).unlink(missing_ok=True)
    (root / "a" / entry).symlink_to(target)
    with pytest.raises(AdapterSourceError, match=re.escape(f"{entry} {LEADS_OUT}")):
        AdapterSources(roots=(root,)).check(str(root / "a"), runtime=True)


def test_symlink_inside_the_roots_is_followed(layout, tmp_path):
    root, _ = layout
    (root / "b").symlink_to(root / "a", target_is_directory=True)
    assert AdapterSources(roots=(root,)).check(str(root / "b"), runtime=True) == str((root / "a").resolve())


def test_root_given_through_a_symlink(layout, tmp_path):
    root, outside = layout
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    sources = AdapterSources(roots=(tmp_path / "root-link",))
    assert sources.roots == (root.resolve(),)
    expected = str((root / "a").resolve())
    assert sources.check(str(tmp_path / "root-link" / "a"), runtime=True) == expected
    assert sources.check(str(root / "a"), runtime=True) == expected
    with pytest.raises(AdapterSourceError, match=OUTSIDE):
        sources.check(str(outside / "a"), runtime=True)


def test_missing_root_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"adapter root .* does not exist"):
        AdapterSources(roots=(tmp_path / "nowhere",))


def test_missing_folder_inside_a_root_is_not_found_not_forbidden(layout):
    root, _ = layout
    with pytest.raises(AdapterNotFoundError, match="is neither an existing folder nor a hub id") as refused:
        AdapterSources(roots=(root,)).check(str(root / "b"), runtime=True)
    assert not isinstance(refused.value, AdapterSourceError)


def test_without_roots_any_path_is_accepted(layout, monkeypatch):
    _, outside = layout
    sources = AdapterSources()
    assert sources.check(str(outside / "a"), runtime=True) == str((outside / "a").resolve())
    monkeypatch.chdir(outside)
    assert sources.check("../outside/a", runtime=True) == str((outside / "a").resolve())
    with pytest.raises(AdapterNotFoundError, match="is neither an existing folder nor a hub id"):
        sources.check(str(outside / "b"), runtime=True)


# ---- hub ids from the local cache ------------------------------------------------------------------------


@pytest.fixture
def hub_cache(adapter, tmp_path, monkeypatch) -> Path:
    """A local Hugging Face cache holding someone/tiny-lora as huggingface_hub lays it out; its snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-lora"
    snapshot = place(adapter, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_hub_id_in_the_local_cache_is_accepted_with_roots(hub_cache, layout, monkeypatch):
    root, _ = layout
    monkeypatch.chdir(root)  # the working directory holds no someone/tiny-lora folder
    sources = AdapterSources(roots=(root,))
    assert sources.check("someone/tiny-lora", runtime=True) == "someone/tiny-lora"
    with pytest.raises(AdapterNotFoundError, match=r"is neither a folder inside the adapter roots .* nor a hub id "
                                                   r"in the local Hugging Face cache") as refused:
        sources.check("someone/not-cached", runtime=True)
    assert not isinstance(refused.value, AdapterSourceError)


def test_hub_id_shadowed_by_a_folder_outside_the_roots_is_refused(hub_cache, layout, adapter, tmp_path,
                                                                  monkeypatch):
    """resolve_adapter_path reads a local folder before the cache: one outside the roots is never accepted."""
    root, _ = layout
    place(adapter, tmp_path / "cwd" / "someone" / "tiny-lora")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(AdapterNotFoundError, match="is neither a folder inside the adapter roots"):
        AdapterSources(roots=(root,)).check("someone/tiny-lora", runtime=True)


# ---- pickled weights --------------------------------------------------------------------------------------


def test_bin_weights_refused_at_runtime_unless_allowed(llama, tmp_path):
    folder = make_peft_adapter(llama, tmp_path / "bin", r=4, target_modules=QV, safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file()
    assert not (folder / SAFETENSORS_FILE).exists()
    with pytest.raises(AdapterSourceError, match=re.escape(PICKLE) + r".*or start the server with --allow-lora-bin"):
        AdapterSources().check(str(folder), runtime=True)
    with pytest.raises(AdapterSourceError, match=PICKLE):
        AdapterSources(roots=(tmp_path,)).check(str(folder), runtime=True)
    assert AdapterSources(allow_bin=True).check(str(folder), runtime=True) == str(folder.resolve())
    assert AdapterSources().check(str(folder), runtime=False) == str(folder.resolve())  # start-up: the operator's


# ---- file sizes and headers, checked before reading --------------------------------------------------------


def test_oversize_file_is_refused_before_it_is_read(adapter, tmp_path):
    folder = place(adapter, tmp_path / "a")
    read_adapter_files(folder, "x", max_file_mb=1)  # the real adapter fits
    with (folder / SAFETENSORS_FILE).open("r+b") as file:
        file.truncate(10 * 2**30)  # sparse: 10 GiB that reading would take seconds and as much memory
    start = time.perf_counter()
    with pytest.raises(LoRAError, match=re.escape(f"{SAFETENSORS_FILE} is 10240.0 MiB, above the limit of 1 MiB per "
                                                  f"adapter file; if the file is genuine, start the server with "
                                                  f"--max-lora-file-mb 10240")):
        read_adapter_files(folder, "x", max_file_mb=1)
    assert time.perf_counter() - start < 1.0


def test_oversize_config_is_refused(adapter, tmp_path):
    folder = place(adapter, tmp_path / "a")
    with (folder / "adapter_config.json").open("r+b") as file:
        file.truncate(3 * 2**20)
    with pytest.raises(LoRAError, match=r"adapter_config\.json is 3\.0 MiB, above the limit of 2 MiB"):
        read_adapter_files(folder, "x", max_file_mb=2)


def write_safetensors(path: Path, header: dict, data: bytes, header_size: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if header_size is None else header_size).to_bytes(8, "little") + raw + data)


def test_header_claiming_a_huge_tensor_is_refused_from_the_header(adapter, tmp_path):
    folder = place(adapter, tmp_path / "a")
    claimed = 2**40 * 4
    write_safetensors(folder / SAFETENSORS_FILE,
                      {"t": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, claimed]}}, bytes(16))
    with pytest.raises(LoRAError, match=re.escape(f"is corrupt or truncated (tensor 't' of shape [{2**40}] F32 does "
                                                  f"not fit its data_offsets [0, {claimed}] within the file's data "
                                                  f"section of 16 bytes)")):
        read_adapter_files(folder, "x", max_file_mb=1)


def test_header_whose_shape_and_offsets_disagree_is_refused(adapter, tmp_path):
    folder = place(adapter, tmp_path / "a")
    write_safetensors(folder / SAFETENSORS_FILE, {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
                      bytes(16))
    with pytest.raises(LoRAError, match=re.escape("tensor 't' of shape [2, 2] F32 does not fit its data_offsets "
                                                  "[0, 8]")):
        read_adapter_files(folder, "x", max_file_mb=1)
    write_safetensors(folder / SAFETENSORS_FILE, {"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                      bytes(1))
    with pytest.raises(LoRAError, match=re.escape("tensor 't' has dtype 'F4', not one of BOOL")):
        read_adapter_files(folder, "x", max_file_mb=1)
    start = time.perf_counter()  # a shape whose product has 100,000 digits is refused without computing it
    write_safetensors(folder / SAFETENSORS_FILE, {"t": {"dtype": "F32", "shape": [10] * 100_000,
                                                        "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(LoRAError, match=re.escape("tensor 't' of shape [10, 10, 10")):
        read_adapter_files(folder, "x", max_file_mb=1)
    assert time.perf_counter() - start < 1.0


def test_header_length_beyond_the_file_is_refused(adapter, tmp_path):
    folder = place(adapter, tmp_path / "a")
    write_safetensors(folder / SAFETENSORS_FILE, {}, bytes(16), header_size=2**20)
    with pytest.raises(LoRAError, match=re.escape(f"is corrupt or truncated (its header claims {2**20} bytes, the "
                                                  f"file holds 18 after the length")):
        read_adapter_files(folder, "x", max_file_mb=1)


# ---- values ----------------------------------------------------------------------------------------------


def test_nan_tensor_is_refused_at_load(llama, adapter, tmp_path):
    folder = place(adapter, tmp_path / "a")
    tensors = load_file(folder / SAFETENSORS_FILE)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / SAFETENSORS_FILE)
    with pytest.raises(LoRAError, match=re.escape(f"adapter 'x': tensor {key!r} holds NaN or infinite values")):
        load_adapter(LoRARequest("x", 1, str(folder)), target_spec(llama), 16, torch.float32)


# ---- through the engine ------------------------------------------------------------------------------------


def test_engine_refuses_an_adapter_file_above_max_lora_file_mb(tmp_path):
    from transformers import AutoModelForCausalLM

    model_path = make_tiny_model("llama", tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    folder = make_peft_adapter(hf, tmp_path / "big", r=192,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    assert (folder / SAFETENSORS_FILE).stat().st_size > 2**20
    llm = LLM(str(model_path), dtype="float32", max_model_len=32, num_kv_blocks=16, block_size=4,
              enable_lora=True, max_lora_file_mb=1)
    with pytest.raises(LoRAError, match=r"adapter 'big': .*adapter_model\.safetensors is [\d.]+ MiB, above the "
                                        r"limit of 1 MiB per adapter file; .*--max-lora-file-mb \d+"):
        llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False, lora_request=LoRARequest("big", 1,
                                                                                                  str(folder)))
