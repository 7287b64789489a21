"""The container tests run last in `make test` (the image's, then the compose file's):
they build images (minutes when their cache is cold), so every faster test has
reported before them."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["test_image.py", "test_compose.py"]


def pytest_collection_modifyitems(session, config, items):
    def key(item) -> tuple[bool, int]:
        path = Path(str(item.path)).resolve()
        mine = HERE in path.parents
        return mine, ORDER.index(path.name) if mine and path.name in ORDER else 0
    items.sort(key=key)
