"""Labelled-data builders: the "tuning never reads the test split" checks."""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterable

from router.core.records import Dataset


def scramble(ds: Dataset, ids: set[str] | None = None, seed: int = 0) -> Dataset:
    """The same data with the chosen rows' labels and confidences redrawn at random
    (by default every test row): knobs fitted on train must not move."""
    rng = random.Random(seed)
    out = []
    for r in ds.records:
        if (r.id in ids) if ids is not None else r.split == "test":
            resp = {m: dataclasses.replace(x, correct=float(rng.random() < 0.5),
                                           logprob=None if x.logprob is None else -rng.random() * 3,
                                           p_true=None if x.p_true is None else rng.random())
                    for m, x in r.responses.items()}
            r = dataclasses.replace(r, responses=resp)
        out.append(r)
    return Dataset(ds.path, out, list(ds.models), ds.models_meta)


def chosen_knobs(res: dict[str, Any], names: Iterable[str] | None = None, fold: int | None = None) -> dict[str, Any]:
    """Every knob value an evaluation chose, per entry: at parity and along the frontier
    (or, with `fold`, that fold's knobs)."""
    wanted = None if names is None else set(names)
    out = {}
    for e in res["policies"]:
        if not e["applicable"] or (wanted is not None and e["name"] not in wanted):
            continue
        if fold is not None:
            out[e["name"]] = e["fold_knobs"][fold]
            continue
        par = e["parity"]
        out[e["name"]] = {"parity": par["params"] if par["reachable"] else None,
                          "frontier": [p["params"] for p in e["frontier"]]}
        if "random_at_matched_cost" in par:
            out[e["name"]]["matched_random_cost"] = par["train_cost"]
    return out
