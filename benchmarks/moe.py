"""MoE row: a small random Mixtral (sized to run on two cores), served bare and with 8 mixed all-linear r16
adapters (PEFT's all-linear on Mixtral adapts attention, the router and every expert through
target_parameters), round-robin in one run so both see the same machine state.

    python benchmarks/moe.py [--num-prompts 64 --output-len 128 --repeats 3]

Prints tokens/s per configuration (median of --repeats) and the LoRA / base ratio.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
import transformers

from lora_overhead import make_adapters, requests_for, run_engine
from loraserve import LLM
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts, workload_parser


def make_mixtral(out: Path, tokenizer_folder: Path) -> Path:
    """Random Mixtral, 4 layers x 8 experts (top-2), hidden 256, with the default model's tokenizer."""
    tokenizer = load_tokenizer(tokenizer_folder)
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        sliding_window=None, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    folder = make_mixtral(tmp / "mixtral", resolve_model(args.model))
    prompts = make_prompts(load_tokenizer(folder), args.num_prompts, seed=0)
    adapters = make_adapters(folder, tmp, 16, 8, seed=0)
    loras, _ = requests_for(adapters, len(prompts))
    llm = LLM(str(folder), dtype=args.dtype, max_num_seqs=args.num_prompts, enable_lora=True, max_loras=8,
              max_lora_rank=32)  # PEFT doubles r on the fused gate_up_proj
    print(f"random Mixtral (4 layers, 8 experts top-2, hidden 256)  dtype {llm.engine.dtype}  "
          f"{len(prompts)} prompts x {args.output_len} tokens, median of {args.repeats} round-robin rounds")
    runs: dict[str, list[float]] = {"base": [], "8 mixed r16 all-linear": []}
    for _ in range(args.repeats):
        runs["base"].append(run_engine(llm, prompts, args.output_len, None, 1)[0])
        runs["8 mixed r16 all-linear"].append(run_engine(llm, prompts, args.output_len, loras, 1)[0])
    medians = {name: statistics.median(values) for name, values in runs.items()}
    for name, value in medians.items():
        print(f"{name:>24}: {value:8.1f} tok/s  (runs {', '.join(f'{v:.0f}' for v in runs[name])})")
    print(f"LoRA / base: {medians['8 mixed r16 all-linear'] / medians['base']:.3f}")


if __name__ == "__main__":
    main()
