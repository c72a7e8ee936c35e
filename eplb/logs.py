"""Log output for the daemons: JSON lines (the default) or plain text.

A log call adds context with ``extra=`` (``log.info("...", extra={"epoch": 3, "rank": 1})``);
both formats show it. JSON lines carry ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``,
``node`` and every extra field, so a collector can filter by epoch, rank or step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
#: Context fields shown first, in this order, when present.
CONTEXT = ("node", "epoch", "rank", "step", "phase", "reason")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    ordered = {k: extra.pop(k) for k in CONTEXT if k in extra}
    ordered.update(extra)
    return ordered


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``TIME LEVEL logger: message [key=value ...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            first, _, rest = text.partition("\n")
            fields = " ".join(f"{k}={v}" for k, v in extras.items())
            text = f"{first} [{fields}]" + (f"\n{rest}" if rest else "")
        return text


class _LeadingNumbers(logging.Filter):
    """Lines written as ``log.info("epoch %d: ...", epoch, ...)`` or ``"rank %d ..."`` (the
    leader's and the agreement's) get that number as the ``epoch`` or ``rank`` field, so older
    log calls are as searchable as those that pass ``extra=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if isinstance(msg, str) and isinstance(args, tuple) and args and isinstance(args[0], int):
            for word in ("epoch", "rank"):
                if msg.startswith(f"{word} %d") and not hasattr(record, word):
                    setattr(record, word, args[0])
        return True


class _Context(logging.Filter):
    """Adds fixed fields (the node) to every record that does not set them."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def setup_logging(fmt: str = "json", level: str = "INFO", stream: IO[str] | None = None,
                  **context: Any) -> None:
    """Send the root logger's records to ``stream`` (stdout) in ``fmt`` (``json`` or ``human``),
    each with ``context`` (e.g. ``node=1``) unless the call sets those fields itself."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(_LeadingNumbers())
    if context:
        handler.addFilter(_Context(context))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
