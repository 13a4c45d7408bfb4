"""What a request generates from, and how the engine turns it into token ids.

Prompts are prepared where the request is made (LLMEngine.make_request, in a worker thread for the server),
never on the server's event loop: a chat template is arbitrary Jinja and a long prompt's tokenising takes
milliseconds, either of which would stall every other client's stream."""
from __future__ import annotations

from dataclasses import dataclass

import jinja2

from loraserve.errors import ParamError


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the chat template of the tokenizer the request uses (an adapter saved
    with its own tokenizer brings its own template)."""

    messages: list[dict[str, str]]
    add_generation_prompt: bool = True


def prompt_tokens(prompt: str | ChatPrompt | None, token_ids: list[int] | None,
                  tokenizer) -> tuple[str | None, list[int]]:
    """The prompt's text (the rendered template for a chat) and its token ids; given ids are taken as they
    are. A conversation the template refuses is the caller's to fix (ParamError on "prompt")."""
    if token_ids is not None:
        return (prompt if isinstance(prompt, str) else None), list(token_ids)
    if prompt is None:
        raise ParamError("prompt", "give a {param} or prompt_token_ids")
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(_unicode(prompt))
    try:
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=prompt.add_generation_prompt,
                                             tokenize=False)
    except (jinja2.TemplateError, ValueError) as e:  # the template's own raise_exception(...) says what is wrong
        raise ParamError("prompt", f"the messages do not fit the model's chat template: {e}") from e
    return text, tokenizer.encode(_unicode(text), add_special_tokens=False)


def _unicode(text: str) -> str:
    """`text`, if a tokenizer can take it: JSON can carry lone surrogates (\ud800), which are no characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParamError("prompt", f"the {{param}} holds {text[e.start:e.end]!r} at character {e.start}, not a "
                                   f"Unicode character (a lone surrogate); send valid UTF-16 pairs or UTF-8") from e
    return text
