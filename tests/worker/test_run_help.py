"""`cascade run --help` states the chunk default the settings really have (issue #23:
it said 16, the settings say 256)."""
from __future__ import annotations

from click.testing import CliRunner

from worker.cli.run_cmd import run
from worker.config.settings import Settings


def test_run_help_states_the_real_chunk_default():
    r = CliRunner().invoke(run, ["--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    default = Settings.model_fields["chunk_size"].default
    assert f"$CASCADE_CHUNK_SIZE or {default})" in " ".join(r.output.split()), r.output
