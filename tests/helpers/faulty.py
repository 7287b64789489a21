"""A replay backend that fails on chosen records, to test dead letters: `raise`
makes its stage raise every time, `exit` kills the worker process every time.

Worker processes get it through `python -m helpers.faulty worker ...`, which
registers the kind and runs the `cascade` command; a test registers it in its own
process with `register()`."""
from __future__ import annotations

import os
import sys

from router.core.portfolio import BackendSpec
from worker.models.backends import _KINDS
from worker.models.backends.replay import ReplayBackend

KIND = "faulty"


class FaultyBackend(ReplayBackend):
    kind = KIND

    def __init__(self, tier):
        opts = dict(tier.backend.options)
        self.fail_on = set(opts.pop("fail_on", []))
        self.how = opts.pop("how", "raise")
        super().__init__(tier.model_copy(update={"backend": BackendSpec(kind="replay", **opts)}))
        self.tier = tier

    def generate(self, query, needs):
        if query.id in self.fail_on:
            if self.how == "exit":
                os._exit(3)  # as a segfault or the OOM killer would: no cleanup, no ack
            raise RuntimeError(f"injected crash on {query.id}")
        return super().generate(query, needs)


def register() -> None:
    _KINDS[KIND] = f"{__name__}:FaultyBackend"


if __name__ == "__main__":
    register()
    from worker.cli import main

    sys.argv[0] = "cascade"
    main()
