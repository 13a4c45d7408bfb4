"""The request policy: who is asking (a Principal, from the API key) and what one request may ask for.

Authentication yields a Principal that every handler receives: its tenant (a name for logs and metrics; never
the key), the adapter names or globs it may use, list and load, and its concurrency limit. The single server
and the Ray ingress authenticate with the same Tenants; the ingress hands the principal to its replica's app
in the ASGI scope, which no HTTP client can reach.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from loraserve.server.protocol import APIError

logger = logging.getLogger(__name__)

PRINCIPAL_SCOPE_KEY = "loraserve.principal"  # set in-process by the Ray ingress, trusted by the replica's app
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    """What one request, and one tenant at a time, may ask for; None: no limit. Each refusal names the limit
    and the flag that raises it."""

    max_body_bytes: int = 16 * 2**20  # --max-body-bytes: 413 above
    max_prompts: int = 64  # --max-prompts-per-request: prompts of one /v1/completions request
    max_stop: int = 16  # --max-stop-strings: entries of stop, and of stop_token_ids
    max_stop_length: int = 256  # --max-stop-length: characters of one stop string
    max_prompt_tokens: int | None = None  # --max-prompt-tokens: below the context length
    max_waiting: int | None = 1024  # --max-waiting-requests: prompts accepted but not yet generating (503)
    max_concurrency: int | None = None  # --max-concurrency-per-key: a key's requests at once (429)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or unset), got {value!r}")


@dataclass(frozen=True)
class Principal:
    """What a request may do, as its API key says."""

    tenant: str  # a name for logs and metrics, never the key
    adapters: tuple[str, ...] = ("*",)  # adapter names or fnmatch globs it may use, list, load and unload
    max_concurrency: int | None = None  # its own cap; None: the server's --max-concurrency-per-key

    def may_use(self, adapter: str) -> bool:
        return any(fnmatchcase(adapter, pattern) for pattern in self.adapters)


ANONYMOUS = Principal("anonymous")  # no key configured: every client may use every adapter


def unauthorized() -> APIError:
    return APIError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key", reason="unauthorized")


class Tenants:
    """The API keys and what each may do: `--api-key` (one key, every adapter) and/or `--api-keys-file`, a
    JSON object {key: {"adapters": [names or globs], "max_concurrency": n, "tenant": name}} (or {key: [globs]}).
    `reload` re-reads the file (on SIGHUP); a file that does not parse leaves the table as it was."""

    def __init__(self, api_key: str | None = None, keys_file: str | Path | None = None) -> None:
        self.api_key = api_key
        self.keys_file = Path(keys_file) if keys_file is not None else None
        self._lock = threading.Lock()
        self._table: list[tuple[bytes, Principal]] = []
        self.reload()

    @property
    def enabled(self) -> bool:
        return self.api_key is not None or self.keys_file is not None

    def reload(self) -> None:
        """Build the table anew and swap it in at once; in-flight requests keep the principal they got.
        Raises ValueError (the reason, never a key) when the file is unusable; the old table stays."""
        table = [(_digest(self.api_key), Principal("api-key"))] if self.api_key is not None else []
        if self.keys_file is not None:
            table += parse_keys_file(self.keys_file)
        with self._lock:
            self._table = table
        logger.info("API keys: %d loaded", len(table))

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of `Authorization: Bearer <key>`; 401 for a missing or unknown key. Every stored key
        is compared, in constant time, whatever matches: the time taken says nothing about any key."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        digest = _digest(token.strip())
        found = None
        for stored, principal in self._table:
            if hmac.compare_digest(stored, digest) and scheme.lower() == "bearer":
                found = principal
        if found is None:
            raise unauthorized()
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys_file(path: Path) -> list[tuple[bytes, Principal]]:
    """The file's (key digest, principal) pairs. Errors name the entry by position and tenant, never by key."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--api-keys-file {path}: cannot read it as JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--api-keys-file {path}: expected a non-empty JSON object mapping each API key to "
                         f'{{"adapters": [names or globs], "max_concurrency": n}}')
    table = []
    for index, (key, entry) in enumerate(raw.items()):
        where = f"--api-keys-file {path}, entry {index + 1}"
        if not key.strip() or key != key.strip():
            raise ValueError(f"{where}: a key must be non-empty, without surrounding whitespace")
        table.append((_digest(key), _principal(entry, where, f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}")))
    return table


def _principal(entry: Any, where: str, default_tenant: str) -> Principal:
    if isinstance(entry, list):
        entry = {"adapters": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a list of adapter globs or an object with 'adapters'")
    unknown = set(entry) - {"adapters", "max_concurrency", "tenant"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; use adapters, max_concurrency, tenant")
    adapters = entry.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise ValueError(f"{where}: 'adapters' must be a list of adapter names or globs (e.g. \"support-*\"); "
                         f"[] allows the base model only")
    cap = entry.get("max_concurrency")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"{where}: 'max_concurrency' must be a positive integer")
    tenant = entry.get("tenant", default_tenant)
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"{where}: 'tenant' must be a non-empty string")
    return Principal(tenant, tuple(adapters), cap)


class Admission:
    """Counts what is in flight: each tenant's requests (429 past its concurrency cap) and the prompts accepted
    but not yet generating (503 with Retry-After past --max-waiting-requests). Event-loop only: no lock."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.waiting = 0
        self._running: dict[str, int] = {}

    def enter(self, principal: Principal, prompts: int) -> Ticket:
        cap = principal.max_concurrency or self.limits.max_concurrency
        held = self._running.get(principal.tenant, 0)
        if cap is not None and held >= cap:
            raise APIError(429, f"this API key already has {held} requests in flight, its limit; wait for one to "
                           f"finish (the limit is --max-concurrency-per-key, or the key's max_concurrency)",
                           code="rate_limit_exceeded", error_type="rate_limit_error", reason="concurrency_limit",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        limit = self.limits.max_waiting
        if limit is not None and self.waiting + prompts > limit:
            raise APIError(503, f"the server has {self.waiting} prompts waiting to start, its limit "
                           f"(--max-waiting-requests {limit}); retry shortly", reason="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self._running[principal.tenant] = held + 1
        self.waiting += prompts
        return Ticket(self, principal.tenant, prompts)


class Ticket:
    """One admitted request: `started` once per prompt as it produces its first output, `close` at the end
    (both idempotent, so every exit path may call them)."""

    def __init__(self, admission: Admission, tenant: str, prompts: int) -> None:
        self._admission = admission
        self._tenant = tenant
        self._waiting = prompts
        self._open = True

    def started(self) -> None:
        if self._waiting:
            self._waiting -= 1
            self._admission.waiting -= 1

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._admission.waiting -= self._waiting
        self._waiting = 0
        running = self._admission._running
        running[self._tenant] -= 1
        if not running[self._tenant]:
            del running[self._tenant]


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, from Content-Length before reading anything, else as
    the bytes arrive (read here, then handed on whole: the app reads the body whole anyway). `refused` hears of
    each refusal, for the metrics and the log."""

    def __init__(self, app, max_bytes: int, refused: Callable[[dict, APIError], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refused = refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._refuse(scope, send, APIError(400, "the Content-Length header is not a number",
                                                            reason="bad_header"))
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(scope, send, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, send, self._too_large())
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnects
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                        f"(--max-body-bytes); send a smaller request", code="request_too_large",
                        reason="body_too_large")

    async def _refuse(self, scope: dict, send, error: APIError) -> None:
        self.refused(scope, error)
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
