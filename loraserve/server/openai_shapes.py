"""The OpenAI JSON shapes of logprobs and usage, built from engine outputs."""
from __future__ import annotations

from loraserve.outputs import Logprob, RequestOutput


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], text_offsets: list[int]) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives, and where
    each token's text begins in the choice's text (from the engine's detokeniser, so multi-byte characters
    split over tokens do not shift the offsets, and a stream reports the same offsets as one response)."""
    tokens, token_logprobs, top = [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token_id]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        top.append({lp.decoded_token: lp.logprob for lp in entry.values()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": list(text_offsets[:len(tokens)])}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int) -> dict:
    """The chat shape: per token its logprob, bytes and its top_k alternatives by rank."""

    def item(lp: Logprob) -> dict:
        return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode())}

    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        top = sorted((lp for lp in entry.values() if lp.rank <= top_k), key=lambda lp: lp.rank)
        content.append(item(entry[token_id]) | {"top_logprobs": [item(lp) for lp in top]})
    return {"content": content}


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
