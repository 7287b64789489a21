"""The Markov-copula model (rational tuning): the fit recovers planted parameters,
its cascade figures match a direct computation, and bad input is named."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, ndtr

from router.lab.copula import CascadeModel, ModelError, fit_logistic, fit_rho, transform


def _chain(n: int, rhos: list[float], seed: int) -> np.ndarray:
    """Latent Markov Gaussian chain with the planted consecutive correlations."""
    rng = np.random.default_rng(seed)
    z = np.empty((n, len(rhos) + 1))
    z[:, 0] = rng.standard_normal(n)
    for j, r in enumerate(rhos):
        z[:, j + 1] = r * z[:, j] + np.sqrt(1 - r * r) * rng.standard_normal(n)
    return z


def test_copula_fit_recovers_planted_correlations_under_any_marginals():
    z = _chain(20_000, [0.7, 0.3], seed=1)
    u = ndtr(z)
    # three very different monotone marginals: the copula does not see them
    x0, x1, x2 = u[:, 0] ** 4, np.log(u[:, 1] / (1 - u[:, 1])), -np.exp(-3 * u[:, 2])
    assert fit_rho(x0, x1) == pytest.approx(0.7, abs=0.02)
    assert fit_rho(x1, x2) == pytest.approx(0.3, abs=0.02)
    # Markov: stages two apart are correlated through the middle one only
    assert fit_rho(x0, x2) == pytest.approx(0.21, abs=0.03)


def test_logistic_calibration_recovers_planted_coefficients():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, 40_000)
    y = (rng.random(x.size) < expit(-0.5 + 1.5 * x)).astype(float)
    a, b = fit_logistic(x, y, l2=0.0)
    assert a == pytest.approx(-0.5, abs=0.06) and b == pytest.approx(1.5, abs=0.06)


def test_model_figures_match_the_planted_cascade():
    n = 30_000
    z = _chain(n, [0.6], seed=3)
    p = ndtr(z)  # p_true confidences, uniform marginals
    rng = np.random.default_rng(4)
    truth = [expit(-1 + 2.5 * transform("p_true", p[:, j])) for j in range(2)]
    correct = [(rng.random(n) < t).astype(float) for t in truth]
    cost = [np.full(n, 1.0), np.full(n, 5.0)]
    m = CascadeModel("p_true", [p[:, 0], p[:, 1]], correct, cost, samples=200_000, seed=5)
    assert m.rhos[0] == pytest.approx(0.6, abs=0.02)
    for th in (0.3, 0.6, 0.9):
        acc, c = m.evaluate([th])
        accept = p[:, 0] >= th
        direct_acc = np.where(accept, truth[0], truth[1]).mean()
        assert acc == pytest.approx(direct_acc, abs=0.01)
        assert c == pytest.approx(1.0 + 5.0 * (1 - accept.mean()), abs=0.05)


def test_bad_input_is_named():
    x = np.linspace(0, 1, 50)
    with pytest.raises(ModelError, match="at least 3 paired rows, got 2"):
        fit_rho(x[:2], x[:2])
    with pytest.raises(ModelError, match="stage 0: all 50 rows are right"):
        CascadeModel("p_true", [x, x], [np.ones(50), np.zeros(50)], [np.ones(50), np.ones(50)])
    with pytest.raises(ModelError, match="stage 1: 5 rows with a finite confidence, at least 8 needed"):
        y = x.copy()
        y[5:] = np.nan
        CascadeModel("p_true", [x, y], [np.r_[np.ones(25), np.zeros(25)]] * 2, [np.ones(50)] * 2)


def test_rational_tuner_chooses_from_the_model_and_replays_on_train(bench):
    from router.lab.labelled import prepare
    from router.lab.tuners import fit
    from router.lab.tuning import Target

    L = prepare(bench / "rc-triviaqa.jsonl.gz")
    train, _ = L.train_test()
    f = fit("rational", train, L.tiers(train), Target.budget(2e-4), signal="p_true")  # replayed by confirm
    # the budget is met on the model's figures; the train figures are the replayed ones
    assert f.policy == "rational" and f.train_cost > 0
    assert len(f.params["chain"]) in (2, 3) and set(f.params["thresholds"]) == set(f.params["chain"][:-1])
    assert f.search["model"] == "markov-gaussian-copula" and f.search["model_cost"] <= 2e-4
