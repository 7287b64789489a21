"""Rational-tuning cascade: a threshold cascade whose thresholds were chosen from
a fitted Markov-copula model of the confidences along the chain (Zellinger and
Thomson, arXiv 2501.09345; the model and its tuner live in the lab). At run time
it decides exactly as the threshold cascade does."""
from __future__ import annotations

from .threshold import ThresholdCascade


class RationalCascade(ThresholdCascade):
    name = "rational"
    summary = "threshold cascade with thresholds chosen from a Markov-copula model of the chain's confidences"
