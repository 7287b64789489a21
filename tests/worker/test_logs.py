"""Log lines: JSON with the bound ids and the worker's tier on every line, the
standard library's (Celery's) included; prompts and answers left out unless asked."""
from __future__ import annotations

import json
import logging

import structlog

from worker.config.logs import configure_logging, context


def lines(capsys) -> list[dict]:
    return [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.strip()]


def test_json_lines_carry_ids_and_tier_and_never_the_prompt(capsys):
    configure_logging(True, "INFO", static={"tier": "t0"})
    with context(job="b:1", batch="b", tier="t1", tenant="acme"):
        structlog.get_logger("cascade.stage").warning("stage.something", prompt="secret question", answer="secret")
    logging.getLogger("celery.worker").warning("from the standard library")
    a, b = lines(capsys)
    assert (a["job"], a["batch"], a["tier"], a["tenant"]) == ("b:1", "b", "t1", "acme")  # bound tier wins
    assert "secret" not in json.dumps(a)
    assert b["tier"] == "t0" and b["event"] == "from the standard library"


def test_content_is_logged_only_when_configured(capsys):
    configure_logging(True, "INFO", content=True)
    structlog.get_logger("x").warning("e", prompt="a visible question")
    assert lines(capsys)[0]["prompt"] == "a visible question"
    configure_logging(True, "INFO")
