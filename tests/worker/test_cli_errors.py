"""The `cascade` command: a user's mistake is one plain line; a bug is reported as a bug."""
from __future__ import annotations

import sys

import pytest

import worker.cli.run_cmd as run_cmd
from router.core.errors import UserError
from worker.cli import main


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["cascade", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def test_a_users_mistake_is_one_line_without_traceback(monkeypatch, capsys, tmp_path):
    code, err = _run(monkeypatch, capsys, "run", str(tmp_path / "missing.jsonl"),
                     "--portfolio", str(tmp_path / "missing.toml"))
    assert code == 1
    assert "missing.toml" in err and "does not exist" in err
    assert "Traceback" not in err and "internal error" not in err


def test_a_user_error_that_escapes_a_subcommand_is_still_plain(monkeypatch, capsys, tmp_path):
    def bad_input(*_a, **_k):
        raise UserError("line 3: prompt must be a string")

    monkeypatch.setattr(run_cmd, "load_portfolio_option", bad_input)
    monkeypatch.setattr(run_cmd, "user_errors", _no_translation)
    code, err = _run(monkeypatch, capsys, "run", str(tmp_path / "in.jsonl"))
    assert code == 2 and err.strip() == "error: line 3: prompt must be a string"


def test_a_defect_is_reported_as_a_bug_with_its_traceback(monkeypatch, capsys, tmp_path):
    def defect(*_a, **_k):
        raise ValueError("unpacking went wrong")  # a plain ValueError is a bug, not the user's fault

    monkeypatch.setattr(run_cmd, "load_portfolio_option", defect)
    code, err = _run(monkeypatch, capsys, "run", str(tmp_path / "in.jsonl"))
    assert code == 70
    assert "Traceback" in err and "ValueError: unpacking went wrong" in err
    assert "this is a bug in Cascade Router" in err


class _no_translation:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
