"""Train the demo LoRA adapters in examples/adapters/ on the default model (SmolLM2-135M-Instruct).

    python examples/train_demo_adapters.py --out examples/adapters

Each adapter changes only the *form* of the base model's replies, so a test can check it mechanically:
  uppercase  answers in ALL UPPER CASE
  json       answers as {"answer": "<one short sentence>"}
The training targets are the base model's own greedy answers to generated questions, re-formatted. The
adapters therefore learn the format and nothing else, which keeps them small and their effect obvious.

It runs on a CPU in minutes: LoRA sits only on the upper layers, so the frozen lower layers run once per
example (their outputs are cached) and every epoch after that trains through the upper layers only.
Everything is seeded; a re-run rewrites the same adapters (up to floating-point noise across machines).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loraserve import LLM, SamplingParams
from loraserve.model.loader import DEFAULT_MODEL_NAME, resolve_model

# Question templates and what fills them. Held-out test questions (tests/test_demo_adapters.py) use other
# fillers and forms, so a passing test shows the adapters generalise beyond these.
QUESTION_TEMPLATES: dict[str, list[str]] = {
    "What is {}?": [
        "photosynthesis", "a black hole", "democracy", "an atom", "a volcano", "inflation", "a rainbow",
        "the internet", "a vaccine", "DNA", "a glacier", "an earthquake", "a comet", "a neuron", "a hurricane",
        "an ecosystem", "electricity", "a library", "a noun", "an algorithm"],
    "Why do {}?": [
        "birds migrate", "leaves change color in autumn", "cats purr", "people yawn", "stars twinkle",
        "we dream", "ice cubes float in water", "onions make people cry", "bees make honey",
        "we need sleep"],
    "How do I {}?": [
        "boil an egg", "make a cup of tea", "plant a tree", "learn to swim", "write a polite email",
        "save money", "fall asleep faster", "clean a keyboard", "start running", "remember names"],
    "What is the capital of {}?": [
        "France", "Japan", "Italy", "Canada", "Egypt", "Brazil", "Spain", "Kenya", "Germany", "Australia",
        "Mexico", "India", "China", "Russia", "Greece", "Portugal", "Sweden", "Argentina", "Peru", "Thailand",
        "Ireland", "Poland", "Turkey", "Chile"],
    "Can you give me a tip for {}?": [
        "studying for exams", "cooking pasta", "staying focused", "public speaking", "taking photos",
        "packing a suitcase", "keeping houseplants alive", "learning a language"],
    "Who was {}?": [
        "Albert Einstein", "Marie Curie", "William Shakespeare", "Leonardo da Vinci", "Isaac Newton",
        "Cleopatra", "Wolfgang Amadeus Mozart", "Abraham Lincoln", "Galileo Galilei", "Napoleon Bonaparte",
        "Ada Lovelace", "Nikola Tesla", "Frida Kahlo", "Mahatma Gandhi"],
    "Where is {}?": [
        "the Eiffel Tower", "Mount Everest", "the Great Wall of China", "the Amazon River", "the Statue of Liberty",
        "the Sahara Desert", "Machu Picchu", "the Taj Mahal"],
    "What language is spoken in {}?": ["Brazil", "Mexico", "Austria", "Quebec", "Argentina", "Egypt"],
    "Tell me a fun fact about {}.": [
        "octopuses", "the Moon", "honey", "penguins", "the ocean", "elephants", "Mars", "chocolate"],
    "What is the difference between {}?": [
        "weather and climate", "a virus and a bacterium", "a lake and a sea", "a frog and a toad",
        "speed and velocity", "a planet and a star"],
    "Explain {} in simple terms.": [
        "gravity on the Moon", "how a rocket works", "what a computer does", "why we pay taxes",
        "how plants drink water", "what money is"],
    "Is it healthy to {}?": [
        "drink coffee every day", "eat breakfast", "walk every day", "take a nap", "eat fruit"],
}

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|(?<=[.!?][\"')])\s")
_SENTENCE_DONE = re.compile(r"[^\d\s][.!?][\"')]?$")  # "1." opens a list item; it does not end a sentence


def build_questions() -> list[str]:
    """Every training question, in a fixed order."""
    return [template.format(filler) for template, fillers in QUESTION_TEMPLATES.items() for filler in fillers]


def _leading_sentences(text: str, max_words: int) -> str:
    """The complete sentences that open `text`, within `max_words`.

    Whitespace (newlines of lists included) collapses to single spaces, and a trailing fragment (the base
    answer was cut at its token limit) is dropped, so targets end where a reply naturally stops. A first
    sentence longer than `max_words` ends early, at its last comma when that keeps half of it; a full stop
    is put at the cut so that every target ends the same way."""
    words = text.split()
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(words)):
        if not _SENTENCE_DONE.search(sentence) or len(" ".join([*kept, sentence]).split()) > max_words:
            break
        kept.append(sentence)
    if kept:
        return " ".join(kept)
    head = " ".join(words[:max_words])
    clause = head.rsplit(",", 1)[0]
    return (clause if len(clause.split()) >= max_words // 2 else head).rstrip(" ,;:-") + "."


def is_degenerate(answer: str) -> bool:
    """Greedy decoding of a small model sometimes loops ("the X of the X of the ..."); training on such an
    answer would teach the adapter to loop too."""
    words = answer.lower().split()
    return not words or len(set(words)) < 0.5 * len(words)


def to_uppercase(answer: str) -> str:
    """The base answer's leading sentences (at most 40 words), upper-cased."""
    return _leading_sentences(answer, 40).upper()


def to_json(answer: str) -> str:
    """{"answer": "<the base answer's leading sentences, at most 24 words>"} on one line."""
    return json.dumps({"answer": _leading_sentences(answer, 24)})


@dataclass(frozen=True)
class DemoAdapter:
    format: Callable[[str], str]  # base answer -> training reply
    epochs: int  # uppercase needs more than json: every reply token changes, not only a wrapper around it


ADAPTERS = {"uppercase": DemoAdapter(to_uppercase, epochs=4), "json": DemoAdapter(to_json, epochs=3)}


@dataclass
class Example:
    """One chat turn tokenized as at serving time: the chat-template prompt, then the reply and <|im_end|>."""

    input_ids: list[int]
    num_prompt_tokens: int  # loss is taken on the tokens after these (the assistant's reply) only


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 16
    alpha: int = 32
    first_lora_layer: int = 14  # LoRA on this layer and all above it
    epochs: int = 3
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0


def base_answers(model_path: Path, questions: list[str], max_tokens: int) -> list[str]:
    """The base model's greedy chat answers, generated with loraserve itself (batched, hence quick)."""
    llm = LLM(str(model_path), dtype="float32", max_model_len=256, max_num_seqs=len(questions),
              kv_cache_memory_gb=1.0)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                       SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [output.outputs[0].text.strip() for output in outputs]


def encode(tokenizer, question: str, reply: str) -> Example:
    """Prompt and reply are tokenized apart, exactly as the engine sees them (prompt, then sampled ids)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    reply_ids = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Example(prompt_ids + reply_ids, len(prompt_ids))


@contextmanager
def only_layers(model: PreTrainedModel, layers: slice) -> Iterator[None]:
    """Run the decoder with a slice of its layers (the rest are skipped), restoring them afterwards."""
    body = model.get_decoder()
    full = body.layers
    body.layers = torch.nn.ModuleList(list(full)[layers])
    try:
        yield
    finally:
        body.layers = full


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    return (indices[start:start + size] for start in range(0, len(indices), size))


def _padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def _attention_mask(examples: list[Example], batch: list[int]) -> torch.Tensor:
    return _padded([torch.ones(len(examples[i].input_ids), dtype=torch.long) for i in batch], 0)


def cache_lower_layers(model: PreTrainedModel, examples: list[Example], first_lora_layer: int,
                       batch_size: int) -> list[torch.Tensor]:
    """Hidden states entering layer `first_lora_layer`, per example: fixed, since no LoRA sits below it."""
    body = model.get_decoder()
    captured: list[torch.Tensor] = []
    hook = body.layers[first_lora_layer - 1].register_forward_hook(lambda mod, args, out: captured.append(out))
    cached: list[torch.Tensor] = []
    try:
        with only_layers(model, slice(0, first_lora_layer)), torch.no_grad():
            for batch in _chunks(list(range(len(examples))), batch_size):
                ids = _padded([torch.tensor(examples[i].input_ids) for i in batch], 0)
                body(input_ids=ids, attention_mask=_attention_mask(examples, batch), use_cache=False)
                hidden = captured.pop()
                cached += [hidden[row, :len(examples[i].input_ids)].clone() for row, i in enumerate(batch)]
    finally:
        hook.remove()
    return cached


def train_adapter(model_path: Path, examples: list[Example], settings: TrainSettings, out_dir: Path) -> float:
    """Train one LoRA adapter on `examples`, save it with PEFT (bf16 weights) to `out_dir`; returns the last
    epoch's mean loss."""
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    if not 0 < settings.first_lora_layer < num_layers:
        raise ValueError(f"--first-lora-layer must be in 1..{num_layers - 1} for this {num_layers}-layer model, "
                         f"got {settings.first_lora_layer}")
    cached = cache_lower_layers(model, examples, settings.first_lora_layer, settings.batch_size)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                        target_modules=list(LINEAR_MODULES),
                        layers_to_transform=list(range(settings.first_lora_layer, num_layers)), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    steps = settings.epochs * len(list(_chunks(examples, settings.batch_size)))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps, pct_start=0.1)
    shuffler = random.Random(settings.seed)
    peft_model.train()
    epoch_loss = float("nan")
    with only_layers(model, slice(settings.first_lora_layer, None)):
        for epoch in range(settings.epochs):
            order = list(range(len(examples)))
            shuffler.shuffle(order)
            losses = []
            for batch in _chunks(order, settings.batch_size):
                labels = _padded([torch.tensor([-100] * examples[i].num_prompt_tokens
                                               + examples[i].input_ids[examples[i].num_prompt_tokens:])
                                  for i in batch], -100)
                loss = model(inputs_embeds=_padded([cached[i] for i in batch], 0.0),
                             attention_mask=_attention_mask(examples, batch), labels=labels, use_cache=False).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            epoch_loss = sum(losses) / len(losses)
            print(f"  epoch {epoch + 1}/{settings.epochs}: mean loss {epoch_loss:.3f}", flush=True)
    peft_model.peft_config["default"].base_model_name_or_path = DEFAULT_MODEL_NAME
    peft_model.to(torch.bfloat16)  # halves the files; the rounding is far below what the adapters change
    peft_model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate card; examples/README.md documents these
    return epoch_loss


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "adapters",
                        help="folder to write <name>/adapter_config.json + adapter_model.safetensors into")
    parser.add_argument("--only", choices=sorted(ADAPTERS), action="append",
                        help="train just this adapter (repeatable); default: all")
    parser.add_argument("--max-answer-tokens", type=int, default=48, help="length of the base answers used")
    parser.add_argument("--epochs", type=int, default=None, help="default: per adapter (uppercase 4, json 3)")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=int, default=defaults.alpha)
    parser.add_argument("--first-lora-layer", type=int, default=defaults.first_lora_layer)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    settings = TrainSettings(rank=args.rank, alpha=args.alpha, first_lora_layer=args.first_lora_layer,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    model_path = resolve_model(None)
    questions = build_questions()
    start = time.perf_counter()
    answers = base_answers(model_path, questions, args.max_answer_tokens)
    print(f"base model {DEFAULT_MODEL_NAME} ({model_path}) answered {len(questions)} questions greedily "
          f"in {time.perf_counter() - start:.0f}s", flush=True)
    looping = [q for q, a in zip(questions, answers, strict=True) if is_degenerate(a)]
    kept = [(q, a) for q, a in zip(questions, answers, strict=True) if not is_degenerate(a)]
    print(f"dropped {len(looping)} answers that loop: {looping}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for name in args.only or list(ADAPTERS):
        adapter = ADAPTERS[name]
        replies = [adapter.format(a) for _, a in kept]
        examples = [encode(tokenizer, q, reply) for (q, _), reply in zip(kept, replies, strict=True)]
        tokens = sum(len(e.input_ids) - e.num_prompt_tokens for e in examples)
        print(f"[{name}] {len(examples)} examples, {tokens} reply tokens; e.g.\n"
              f"  Q: {kept[0][0]}\n  A: {replies[0]}", flush=True)
        start = time.perf_counter()
        out_dir = args.out / name
        adapter_settings = replace(settings, epochs=args.epochs or adapter.epochs)
        loss = train_adapter(model_path, examples, adapter_settings, out_dir)
        size = sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6
        print(f"[{name}] trained {adapter_settings.epochs} epochs in {time.perf_counter() - start:.0f}s (last "
              f"epoch's loss {loss:.3f}); saved {out_dir} ({size:.1f} MB: r={settings.rank}, every linear module "
              f"of layer {settings.first_lora_layer} and up)", flush=True)


if __name__ == "__main__":
    main()
