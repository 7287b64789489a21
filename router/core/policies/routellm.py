"""RouteLLM's routers (Ong et al., ICLR 2025; method 8), generalised to N models.

The predictor estimates, from the query alone, each model's chance of answering
correctly: matrix factorisation ("mf"), similarity-weighted ranking ("sw": a
Bradley-Terry rating over the train queries most similar to this one), or a
classifier on the query embedding ("linear"); see `router.core.quality`. The
query goes to argmax q_m - lam * relative cost (`QualityRouter`): with two models
that is RouteLLM's "strong when its predicted advantage exceeds the threshold".
lam is calibrated by the tuner (`router.lab.tuners.routellm`) on out-of-fold
train predictions to a target cost, which on files without prices is the share
of calls that go to the strong model.
"""
from __future__ import annotations

from ..policy import Knob
from .quality_router import COMMON_KNOBS, QualityRouter


class RouteLLM(QualityRouter):
    name = "routellm"
    summary = "RouteLLM router (mf / sw / classifier on the query), calibrated to a cost, over N models"
    knobs = COMMON_KNOBS + (Knob("predictor.kind", "choice", "mf, sw or linear", choices=("mf", "sw", "linear")),)
    predictor_kinds = ("mf", "sw", "linear")
