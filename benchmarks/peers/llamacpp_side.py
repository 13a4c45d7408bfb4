"""llama.cpp's side of llamacpp.py, run in the xllamacpp venv (standard library + xllamacpp only).

    python llamacpp_side.py config.json

config.json: {"model": GGUF file, "adapters": [LoRA GGUF files], "parallel": slots, "ctx": tokens per slot,
"threads": n}. One llama.cpp server (its own C++ server, in process) is built once; then each line on stdin is a
batch to run, {"prompts": [[token ids], ...], "adapters": [adapter index or null per prompt], "max_tokens": n},
answered by one line on stdout, {"elapsed": seconds, "tokens": completion tokens}. Every prompt of a batch is
in flight at once (one thread each: the server is thread-safe and batches them itself); a request names its
adapter by setting that adapter's scale to 1 and every other's to 0 (llama.cpp's per-request "lora" field).
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import xllamacpp as xlc


def build(config: dict) -> xlc.Server:
    params = xlc.CommonParams()
    params.model.path = config["model"]
    params.n_parallel = config["parallel"]
    params.n_ctx = config["parallel"] * config["ctx"]
    params.n_batch = params.n_ubatch = 512
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = config["threads"]
    params.cache_prompt = False  # every run prefills its prompts, as loraserve's does with no prefix cache
    params.lora_init_without_apply = True  # loaded at scale 0; each request sets its own
    params.lora_adapters = [xlc.CommonAdapterLoraInfo(path, 0.0) for path in config["adapters"]]
    params.warmup = True
    return xlc.Server(params)


def run(server: xlc.Server, count: int, batch: dict) -> dict:
    def one(i: int) -> int:
        adapter = batch["adapters"][i]
        body = {"prompt": batch["prompts"][i], "max_tokens": batch["max_tokens"], "temperature": 0.0,
                "ignore_eos": True, "cache_prompt": False,
                "lora": [{"id": j, "scale": 1.0 if j == adapter else 0.0} for j in range(count)]}
        result = server.handle_completions(body)
        if "error" in result or "usage" not in result:
            raise RuntimeError(f"llama.cpp request failed: {str(result)[:500]}")
        return result["usage"]["completion_tokens"]

    n = len(batch["prompts"])
    with ThreadPoolExecutor(max_workers=n) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(one, range(n)))
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "tokens": tokens}


def main() -> None:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    server = build(config)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip():
            print("RESULT " + json.dumps(run(server, len(config["adapters"]), json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
