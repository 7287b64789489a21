"""A real OpenAI-compatible server for the tests: llama-cpp-python's own server
(`python -m llama_cpp.server`) serving the local pack's tiny model (SmolLM2-135M,
alias "tiny") on a spare port of 127.0.0.1, started once per test session and
stopped at its end. Tests that use it are marked `models`; the project's fake
servers (helpers.servers) are for fault injection only."""
from __future__ import annotations

import pytest

from helpers.servers import LlamaServer


@pytest.fixture(scope="session")
def llama_server():
    from worker.models import modelpack

    with LlamaServer(modelpack.resolve("tiny")) as server:
        yield server
