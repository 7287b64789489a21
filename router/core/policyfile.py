"""The tuned-policy file: written by `cascade tune` and `cascade demo --calibrate`,
read by a portfolio's `[policy] file = "..."`. This module is its one writer and
its one reader, so the shape lives in one place:

    {"name": POLICY, "params": {...knobs...}, "fitted": {...how they were fitted...}}

`fitted` is provenance for people and for drift checks (data, split, target, train
figures); the runtime reads only `name` and `params`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyFileError


@dataclass(frozen=True)
class TunedPolicy:
    name: str
    params: dict[str, Any]
    fitted: dict[str, Any] = field(default_factory=dict)


def write_policy_file(path: str | Path, tuned: TunedPolicy) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"name": tuned.name, "params": tuned.params, "fitted": tuned.fitted}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    tmp.replace(p)  # a reader never sees half a file
    return p


def read_policy_file(path: str | Path) -> TunedPolicy:
    p = Path(path).expanduser()
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise PolicyFileError(f"policy file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyFileError(f"policy file {str(p)!r} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise PolicyFileError(f"policy file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
        raise PolicyFileError(f"policy file {str(p)!r} has no policy 'name'")
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise PolicyFileError(f"policy file {str(p)!r}: 'params' must be an object, got {type(params).__name__}")
    fitted = doc.get("fitted", {})
    return TunedPolicy(doc["name"], params, fitted if isinstance(fitted, dict) else {})
