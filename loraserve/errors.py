"""The errors a caller can act on, at the bottom floor so every layer raises the same ones and the server
maps exactly these to 4xx answers. Anything else that escapes is a bug: the server answers 500 and logs it."""
from __future__ import annotations


class ParamError(ValueError):
    """A request parameter the caller must change. `param` names it; the message says what would fit.

    The message is a template in which "{param}" stands for the parameter's name, so a front end that calls
    the parameter something else (the chat API's max_completion_tokens for max_tokens) can rename it
    without parsing the text."""

    def __init__(self, param: str, template: str) -> None:
        self.param = param
        self.template = template
        super().__init__(template.replace("{param}", param))

    def renamed(self, param: str) -> ParamError:
        """The same error about the same value, under the caller's name for the parameter."""
        return ParamError(param, self.template)


class ModelNotFoundError(ValueError):
    """The named model is neither a usable local path nor in the local Hugging Face cache."""


class LoRAError(ValueError):
    """An adapter that cannot be served as asked; the message says what to change."""


class AdapterNotFoundError(LoRAError):
    """The adapter's folder, hub snapshot or files are missing."""


class AdapterSourceError(LoRAError):
    """The adapter lies where this server may not load it from (outside --lora-roots, or a pickle at runtime);
    the operator's choice, not the caller's mistake: the server answers 403."""


class AdapterRemovedError(AdapterNotFoundError):
    """The adapter was removed (unloaded) before this request could take it."""


class EngineDeadError(RuntimeError):
    """The engine's step loop failed or was shut down; nothing more will run."""


class RequestFailedError(RuntimeError):
    """The engine could not compute this request: its step raised ("step_error") or the model gave it
    non-finite logits ("nonfinite_logits"). Only this request failed; the engine serves the others on."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the engine failed computing this request ({reason})")
