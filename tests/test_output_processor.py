"""Output processing against the tokenizer itself: SmolLM2's real byte-level tokenizer splits emoji and CJK
characters over several tokens, so streaming token by token must give exactly what decoding everything at
once gives; stop strings, stop tokens, min_tokens and text offsets are checked on the same token streams."""
from __future__ import annotations

import pytest
import torch

from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.output_processor import OutputProcessor, find_stop_string
from loraserve.engine.sequence import Sequence
from loraserve.layers.sampler import SamplerOutput
from loraserve.model.loader import load_tokenizer
from loraserve.outputs import Logprob
from loraserve.sampling_params import SamplingParams

TEXTS = ["Hi 😀 日本語のテキスト 🇯🇵 done — ok ß", "👩‍👩‍👧 家族 and 🙂🙃 x", "plain ascii, nothing to hold back"]
PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return load_tokenizer(default_model_path)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stable(text: str) -> str:
    """What of a decode is final: without a trailing partial character (shown as U+FFFD)."""
    return text.rstrip("\ufffd")


def run(tokenizer, prompt_ids: list[int], output_ids: list[int], params: SamplingParams, logprobs: bool = False,
        max_model_len: int = 4096) -> tuple[Sequence, list[str]]:
    """Feed output_ids one step at a time, as the sampler would; the sequence and the text of each step."""
    processor = OutputProcessor(tokenizer, [EOS], max_model_len)
    seq = Sequence(0, "r", 0, len(prompt_ids), list(prompt_ids), params,
                   detokenizer=processor.detokenizer(prompt_ids, params))
    pieces = []
    for token in output_ids:
        before = seq.output_text
        lp = torch.tensor([-0.5]) if logprobs else None
        processor.append([seq], SamplerOutput(torch.tensor([token]), lp, torch.tensor([1]) if logprobs else None,
                                              None, None))
        assert seq.output_text.startswith(before) or seq.finish_reason == "stop"
        pieces.append(seq.output_text[len(before):])
        if seq.finish_reason is not None:
            break
    return seq, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_final_text_equals_decode_at_every_length(tokenizer, text):
    """Every cut of the token stream, even one inside a character, ends with text == decode(token_ids): the
    held-back bytes are flushed when the sequence ends (by length here)."""
    ids = ids_of(tokenizer, text)
    prompt = ids_of(tokenizer, PROMPT)
    assert text.isascii() or any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))
    for k in range(1, len(ids) + 1):
        seq, pieces = run(tokenizer, prompt, ids[:k], SamplingParams(max_tokens=k))
        assert seq.finish_reason == "length"
        assert "".join(pieces) == seq.output_text == tokenizer.decode(ids[:k])


@pytest.mark.parametrize("text", TEXTS[:2])
def test_prompt_ending_inside_a_character_gives_it_to_the_output(tokenizer, text):
    """A token-id prompt cut inside a character: the output tokens that complete it emit it whole."""
    ids = ids_of(tokenizer, text)
    cuts = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert cuts
    for k in cuts:
        seq, pieces = run(tokenizer, ids[:k], ids[k:], SamplingParams(max_tokens=len(ids) - k))
        assert stable(tokenizer.decode(ids[:k])) + seq.output_text == text
        assert "".join(pieces) == seq.output_text


def test_prompt_ending_in_an_invalid_byte_keeps_it_in_the_prompt(tokenizer):
    """A lone continuation byte is no unfinished character: the output does not start with its U+FFFD."""
    prompt = ids_of(tokenizer, "Hi 😀")
    stray = prompt[-1]  # the emoji's last byte, alone after a complete "Hi 😀"
    output = ids_of(tokenizer, " fine")
    seq, _ = run(tokenizer, [*prompt, stray], output, SamplingParams(max_tokens=len(output)))
    assert seq.output_text == " fine"


@pytest.mark.parametrize("text", TEXTS)
def test_text_offsets_point_where_each_token_text_begins(tokenizer, text):
    ids = ids_of(tokenizer, text)
    seq, _ = run(tokenizer, ids_of(tokenizer, PROMPT), ids, SamplingParams(max_tokens=len(ids), logprobs=0),
                 logprobs=True)
    assert seq.text_offsets == [len(stable(tokenizer.decode(ids[:i]))) for i in range(len(ids))]
    assert all(isinstance(entry[t], Logprob) for t, entry in zip(ids, seq.logprobs, strict=True))


def test_stop_string_inside_min_tokens_window_is_not_matched_later(tokenizer):
    """min_tokens holds the stop back while the first "world" is generated; the next token must not cut
    the text back to before it (only text from after the window is searched): the second one stops."""
    ids = ids_of(tokenizer, "Hello world. Hello world. Hello")
    first = next(i for i in range(len(ids)) if "world" in tokenizer.decode(ids[:i + 1]))
    params = SamplingParams(max_tokens=len(ids), min_tokens=first + 1, stop=["world"])
    seq, pieces = run(tokenizer, ids_of(tokenizer, PROMPT), ids, params)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "world")
    assert seq.output_text == "Hello world. Hello "
    assert "".join(pieces) == seq.output_text


def test_stop_string_across_tokens_and_include_stop_str(tokenizer):
    ids = ids_of(tokenizer, "one two three four five")
    seq, _ = run(tokenizer, ids_of(tokenizer, PROMPT), ids, SamplingParams(max_tokens=20, stop=["e fo", "xyz"]))
    assert (seq.output_text, seq.finish_reason, seq.stop_reason) == ("one two thre", "stop", "e fo")
    seq, _ = run(tokenizer, ids_of(tokenizer, PROMPT), ids,
                 SamplingParams(max_tokens=20, stop=["e fo"], include_stop_str_in_output=True))
    assert seq.output_text == "one two three fo"
    assert max(seq.text_offsets) <= len(seq.output_text)


def test_stop_tokens_eos_and_ignore_eos(tokenizer):
    ids = ids_of(tokenizer, "a b c")
    prompt = ids_of(tokenizer, PROMPT)
    seq, _ = run(tokenizer, prompt, [*ids, EOS, *ids], SamplingParams(max_tokens=20))
    assert (seq.output_text, seq.finish_reason, seq.stop_reason) == ("a b c", "stop", None)
    seq, _ = run(tokenizer, prompt, [*ids, EOS, *ids], SamplingParams(max_tokens=7, ignore_eos=True))
    assert (seq.output_text, seq.finish_reason) == ("a b ca b c", "length")
    seq, _ = run(tokenizer, prompt, [*ids, *ids], SamplingParams(max_tokens=20, stop_token_ids=[ids[1]]))
    assert (seq.finish_reason, seq.stop_reason, seq.output_token_ids) == ("stop", ids[1], ids[:2])
    seq, _ = run(tokenizer, prompt, [*ids, *ids], SamplingParams(max_tokens=20, min_tokens=3,
                                                                  stop_token_ids=[ids[1]]))
    assert (seq.finish_reason, seq.output_token_ids) == ("stop", [*ids, ids[0], ids[1]])


def test_context_length_ends_a_sequence(tokenizer):
    prompt = ids_of(tokenizer, PROMPT)
    ids = ids_of(tokenizer, "1 2 3 4 5 6")
    seq, _ = run(tokenizer, prompt, ids, SamplingParams(max_tokens=None), max_model_len=len(prompt) + 3)
    assert (seq.finish_reason, seq.num_output_tokens) == ("length", 3)


def test_find_stop_string_only_matches_ending_in_new_text():
    assert find_stop_string("ab cd ab", 2, ["ab"]) == (6, "ab")
    assert find_stop_string("ab cd ab", 1, ["ab"]) == (6, "ab")  # a match may start in older text
    assert find_stop_string("ab cd xy", 2, ["ab"]) is None  # an old match is not found again
    assert find_stop_string("xxabc", 3, ["bc", "abc"]) == (2, "abc")  # the earliest wins
    assert find_stop_string("", 0, ["a"]) is None


def test_detokenizer_holds_nothing_after_complete_text(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, ids_of(tokenizer, PROMPT), skip_special_tokens=True)
    assert detokenizer.flush() == ""
    text = "".join(detokenizer.add(t) for t in ids_of(tokenizer, "ok 😀"))
    assert text == "ok 😀" and detokenizer.flush() == ""
