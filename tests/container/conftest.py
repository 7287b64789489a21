"""The container tests run last in `make test`: they build an image (minutes when its
cache is cold), so every faster test has reported before them."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: HERE in Path(str(item.path)).resolve().parents)
