"""Labelled-data builders: planted keyword rows, and the "tuning never reads the test split" checks."""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterable

from router.core.records import Dataset, Record, Response

FILLER = "please answer the question about the river the mountain the city and the year".split()


def keyword_rows(n: int, split: str, seed: int, answer: str = "x", costs: bool = True) -> list[Record]:
    """'small' is right exactly when the prompt holds 'zebra'; 'big' always. Both give `answer`;
    `costs=False` leaves the costs unrecorded."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, 6)
        hit = i % 2 == 0
        words.insert(rng.randrange(7), "zebra" if hit else "okapi")
        resp = {"small": Response(answer, float(hit), 1e-5 if costs else None, None, None, None, None, None),
                "big": Response(answer, 1.0, 1e-3 if costs else None, None, None, None, None, None)}
        rows.append(Record(f"{split}-{i}", " ".join(words) + f" {rng.randrange(1000)}", split, None, None, resp))
    return rows


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
