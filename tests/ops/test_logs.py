"""Log lines: JSON by default with the epoch/rank/step context as fields, plain text on request."""

from __future__ import annotations

import io
import json
import logging

import pytest

from eplb.logs import setup_logging


@pytest.fixture()
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_carry_context_fields(restore_root_logger) -> None:
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out, node=1)
    log = logging.getLogger("eplb.test")
    log.info("rank %d joined at step %d", 3, 17, extra={"rank": 3, "step": 17})
    log.warning("epoch %d: PLAN to %d workers", 5, 4)  # no extra: the leading number is the epoch
    log.debug("not shown at INFO")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed", extra={"epoch": 6, "node": 0})
    first, second, third = (json.loads(line) for line in lines(out))
    assert first["msg"] == "rank 3 joined at step 17" and first["level"] == "INFO"
    assert (first["node"], first["rank"], first["step"]) == (1, 3, 17)
    assert first["logger"] == "eplb.test" and first["ts"].endswith("Z")
    assert second["epoch"] == 5 and "rank" not in second
    assert third["epoch"] == 6 and third["node"] == 0  # a call's own node wins
    assert "RuntimeError: boom" in third["exc"]


def test_human_format_shows_the_same_fields_as_text(restore_root_logger) -> None:
    out = io.StringIO()
    setup_logging("human", "DEBUG", stream=out, node=2)
    logging.getLogger("eplb.test").info("epoch %d aborted: %s", 7, "timeout",
                                        extra={"step": 120})
    (line,) = lines(out)
    assert line.endswith("INFO eplb.test: epoch 7 aborted: timeout [node=2 epoch=7 step=120]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
