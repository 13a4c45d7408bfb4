"""Log set-up for the server: text, or one JSON object per line (`--log-format json`) for log collectors.

A record's `fields` (logging's `extra={"fields": {...}}`) become keys of its JSON object, so a failed request's
line carries its id, tenant, status and reason as fields a collector can index, not as words in a sentence."""
from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's one handler; with JSON, uvicorn's loggers are left to propagate to it (uvicorn is then
    run with log_config=None)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
