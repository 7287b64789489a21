"""Tuner of the FrugalGPT policy: scorers fitted per tier, then the budgeted chain search.

As in FrugalGPT, candidate models are the tiers not dominated on train (cost,
accuracy), chains hold 2..`max_tiers` (3, FrugalGPT's L_max) of them in cost
order, and each chain's thresholds are searched over quantiles of its scores
(all distinct values up to 400 for two tiers, 40 per tier for three). One
scorer is fitted per (tier, earlier tiers of the chain): its agreement features
depend on which answers came before.

Scores a model has seen while fitting are optimistic, so the chain and the
thresholds are chosen on out-of-fold scores (`folds` folds of the train rows);
the policy then carries scorers fitted on every train row, and the reported
train figures are theirs (what `router.lab.simulate` replays). The L2 strength
of each scorer is picked from `Cs` by out-of-fold log-loss. Embeddings are
fitted through their first `components` principal directions on the train
texts, and the weights mapped back onto the 384 raw numbers.

Features: the answer's form and agreement always; sentence embeddings of the
query, and of the answer where answers are short free text, when
`router.core.embeddings` is available (said in the search notes when not;
`text=[]` turns them off); the tier's recorded confidence signals
(logprob, p_true) where the rows carry them (`signals=[]` turns them off, which
is FrugalGPT's text-only scorer).

Two optional blocks beyond FrugalGPT's: `checks` (the answer's arithmetic and use
of the question's numbers, `router.core.worked`; None: on when the answers are
worked numbers) and `words` (the query's hashed words in that many buckets, not
standardised: a scorer that also knows which questions a tier tends to miss).
With `require_checks` the tuner is not applicable unless the checks are on.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from router.core import embeddings
from router.core.answers import infer_kind
from router.core.policy import TierInfo
from router.core.scorers import EMBED_DIM, MAX_WORDS, AnswerScorer, feature_matrix, text_vectors
from router.lab.labelled import CONFIDENCE_SIGNALS, Table
from router.lab.scoring import MIN_ROWS, ScorerError, fit_logistic_scorer, fold_ids, oof_scores
from router.lab.tuning import (
    Fitted,
    NotApplicable,
    Target,
    Tuner,
    TuningError,
    given_chain,
    select_index,
    undominated_pool,
)

from .agreement import answer_texts
from .threshold import GRID, _candidates, chain_grid

CS = (0.01, 0.1, 1.0)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class FrugalGPTTuner(Tuner):
    policy = "frugalgpt"

    def __init__(self, table: Table, infos: Sequence[TierInfo], *, chain: Sequence[str] | None = None,
                 max_tiers: int = 3, prune: bool = True, text: Sequence[str] | None = None,
                 signals: Sequence[str] | None = None, components: int = 32, folds: int = 5,
                 Cs: Sequence[float] = CS, seed: int = 0, checks: bool | None = False, words: int = 0,
                 require_checks: bool = False, **options: Any):
        super().__init__(table, infos, **options)
        if not 2 <= max_tiers <= 3:
            raise TuningError(f"frugalgpt: max_tiers must be 2 or 3, got {max_tiers}")
        self.texts = answer_texts(table)
        if not any(t is not None and t.strip() for row in self.texts for t in row):
            raise NotApplicable("no answer text is recorded, so no answer scorer can be fitted")
        n = table.n
        if n < MIN_ROWS:
            raise NotApplicable(f"frugalgpt: {n} train rows are too few to fit answer scorers (need {MIN_ROWS})")
        self.search: dict[str, Any] = {}
        self.kind = infer_kind(t for row in self.texts for t in row)
        if text is None:
            # the query is embedded once per query, an answer once per tier called; only
            # short free-text answers are (a letter or a worked number says little as a vector)
            text = ("query", "answer") if self.kind == "text" else ("query",)
            if not embeddings.available():
                text = ()
                self.search["note"] = "sentence embeddings unavailable: scorers read answer form and agreement only"
        self.text = tuple(text)
        self.checks = bool(self.kind == "number" if checks is None else checks)
        if require_checks and not self.checks:
            raise NotApplicable(f"the answers are not worked numbers (read as {self.kind}): no arithmetic to check")
        self.words = int(words)
        if not 0 <= self.words <= MAX_WORDS:
            raise TuningError(f"frugalgpt: words must be a number of hash buckets from 0 to {MAX_WORDS}, got {words}")
        if signals is None:  # the confidences the rows record, if any
            signals = [s for s in CONFIDENCE_SIGNALS if np.isfinite(table.conf[s]).any()]
        bad = [s for s in signals if s not in table.conf]
        if bad:
            raise TuningError(f"frugalgpt: signal(s) {bad} are not in the data; recorded: {', '.join(table.conf)}")
        self.signals = tuple(signals)
        self.prompts = [r.prompt for r in table.records]
        # embeddings enter the fit through their first `components` principal directions
        # (fitted on the train texts): fewer numbers to learn from a few hundred rows;
        # the fitted weights are mapped back onto all 384 (the projection is linear)
        self.bases: list[tuple[np.ndarray, np.ndarray]] = []
        for block in self.text:
            V = text_vectors(self.prompts) if block == "query" else text_vectors([t for row in self.texts for t in row])
            mu = V.mean(axis=0)
            _, _, vt = np.linalg.svd(V - mu, full_matrices=False)
            self.bases.append((mu, vt[: min(int(components), vt.shape[0])].T))
        by_name = {t.name: t.index for t in infos}
        if chain is not None:
            chains = [given_chain(chain, by_name)]
        else:
            pool, pruned = undominated_pool(table, infos, prune)
            self.search.update({"models": [infos[i].name for i in pool], "pruned": pruned})
            chains = [c for size in range(2, max_tiers + 1) for c in itertools.combinations(pool, size)]
            if not chains:
                raise NotApplicable(f"frugalgpt: one undominated model only ({self.search['models']}), no chain")
        self.fold = fold_ids(n, max(2, min(int(folds), n // 10)), seed)
        self.Cs = tuple(float(c) for c in Cs)
        self._oof: dict[tuple[int, ...], np.ndarray] = {}
        self._final: dict[tuple[int, ...], dict[str, Any]] = {}
        self._insample: dict[tuple[int, ...], np.ndarray] = {}
        self.chains = chains
        grids = []
        for c in chains:
            conf = [self.oof(c[: p + 1]) for p in range(len(c) - 1)] + [np.zeros(n)]
            cands = [_candidates(conf[p], GRID.get(len(c), 16)) for p in range(len(c) - 1)]
            a, t = chain_grid(conf, [table.correct[i] for i in c], [table.cost[i] for i in c], cands)
            grids.append((cands, a, t))
        self.grids = grids
        self._acc = np.concatenate([g[1] for g in grids])
        self._cost = np.concatenate([g[2] for g in grids])
        self._offsets = np.cumsum([0] + [g[1].size for g in grids])
        self.search.update({"answer_kind": self.kind, "text": list(self.text), "signals": list(self.signals),
                            "checks": self.checks, "words": self.words,
                            "chains": len(chains),
                            "scorers": len(self._oof), "configurations": int(self._acc.size),
                            "chosen_on": f"out-of-fold scores ({len(np.unique(self.fold))} folds of {n} train rows)"})

    # -- scorers, keyed by the chain prefix ending at the scored tier --------------
    def _confidences(self, t: int) -> list[dict[str, float]]:
        return [{s: float(self.table.conf[s][t, j]) for s in self.signals} for j in range(self.table.n)]

    def _features(self, prefix: tuple[int, ...]) -> np.ndarray:
        t = prefix[-1]
        earlier = [[self.texts[e][j] for e in prefix[:-1]] for j in range(self.table.n)]
        X = feature_matrix(self.prompts, self.texts[t], earlier, self._confidences(t), self.kind,
                           len(prefix) - 1, self.signals, self.text, self.checks, self.words)
        head = X.shape[1] - EMBED_DIM * len(self.text) - self.words
        blocks = [X[:, :head]] + [(X[:, head + b * EMBED_DIM: head + (b + 1) * EMBED_DIM] - mu) @ P
                                  for b, (mu, P) in enumerate(self.bases)]
        return np.hstack(blocks + [X[:, X.shape[1] - self.words:]])  # the words last, as `raw` columns

    def _full_weights(self, b: float, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Weights on the projected features -> weights on the raw features."""
        head = w.size - sum(P.shape[1] for _, P in self.bases) - self.words
        out, at = [w[:head]], head
        for mu, P in self.bases:
            wb = P @ w[at: at + P.shape[1]]
            out.append(wb)
            b -= float(mu @ wb)
            at += P.shape[1]
        out.append(w[at:])
        return b, np.concatenate(out)

    def oof(self, prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in self._oof:
            X, y = self._features(prefix), self.table.correct[prefix[-1]]
            what = f"scorer of tier {self.infos[prefix[-1]].name!r}"
            best = None
            for C in self.Cs:
                p = oof_scores(X, y, self.fold, C, what, self.words)
                loss = log_loss(p, (y >= 0.5).astype(float))
                if best is None or loss < best[0]:
                    best = (loss, C, p)
            self._oof[prefix] = best[2]
            try:
                b, w = self._full_weights(*fit_logistic_scorer(X, y, best[1], what, self.words))
            except ScorerError:  # one class on train: a constant scorer at that class's share
                share = float(np.mean(y >= 0.5))
                b, w = (30.0 if share >= 0.5 else -30.0), np.zeros(X.shape[1] - sum(P.shape[1] for _, P in self.bases)
                                                                    + EMBED_DIM * len(self.bases))
            extra: dict[str, Any] = {"checks": True} if self.checks else {}
            if self.words:
                extra["words"] = self.words
            self._final[prefix] = {"kind": self.kind, "agree": len(prefix) - 1, "signals": list(self.signals),
                                   **extra, "text": list(self.text),
                                   "bias": float(b), "w": [float(x) for x in w]}
        return self._oof[prefix]

    def insample(self, prefix: tuple[int, ...]) -> np.ndarray:
        """The final scorer's scores on the train rows, with the policy's own arithmetic."""
        if prefix not in self._insample:
            sc = AnswerScorer(self._final[prefix])
            t = prefix[-1]
            conf = self._confidences(t)
            self._insample[prefix] = np.array([
                sc.score(self.prompts[j], self.texts[t][j], [self.texts[e][j] for e in prefix[:-1]], conf[j])
                for j in range(self.table.n)])
        return self._insample[prefix]

    def select(self, target: Target) -> Fitted:
        i = select_index(self._acc, self._cost, self.resolve(target), "frugalgpt (out-of-fold on train)")
        ci = int(np.searchsorted(self._offsets, i, side="right") - 1)
        c, (cands, _, _) = self.chains[ci], self.grids[ci]
        idx = np.unravel_index(i - self._offsets[ci], tuple(len(x) for x in cands))
        th = [float(cands[p][idx[p]]) for p in range(len(c) - 1)]
        names = [self.infos[t].name for t in c]
        params = {"chain": names, "thresholds": dict(zip(names, th)),
                  "scorers": {names[p]: self._final[c[: p + 1]] for p in range(len(c) - 1)}}
        conf = [self.insample(c[: p + 1]) for p in range(len(c) - 1)] + [np.zeros(self.table.n)]
        a, t = chain_grid(conf, [self.table.correct[x] for x in c], [self.table.cost[x] for x in c],
                          [np.array([v]) for v in th])
        return self._fitted(target, params, a[0], t[0], search=dict(self.search),
                            note="chain and thresholds chosen on out-of-fold scores; train figures: final scorers")
