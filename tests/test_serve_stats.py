"""Statistics of the human-evaluation arena against closed forms and reference implementations."""

import math

import numpy as np
import pytest
from helpers import require_interop

from lmforge.serve import stats
from lmforge.serve.stats import Judgment


def expected_wins(p: np.ndarray, n: float) -> np.ndarray:
    """Points each pair would score in expectation over n games under Bradley–Terry."""
    w = n * p[:, None] / (p[:, None] + p[None, :])
    np.fill_diagonal(w, 0.0)
    return w


def test_bradley_terry_recovers_known_strengths_exactly():
    # With wins equal to their expectations, the MLE is exactly the generating strengths.
    truth = np.array([1.0, 2.0, 4.0, 8.0, 0.5])
    fit = stats.bradley_terry(expected_wins(truth, 10.0))
    truth = truth / math.exp(np.log(truth).mean())  # the fit is normalised to geometric mean 1
    np.testing.assert_allclose(fit, truth, rtol=1e-7)


def test_bradley_terry_recovers_strengths_from_sampled_games():
    rng = np.random.default_rng(0)
    truth = np.array([1.0, 1.5, 3.0, 6.0])
    m = len(truth)
    wins = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            k = rng.binomial(3000, truth[i] / (truth[i] + truth[j]))
            wins[i, j], wins[j, i] = k, 3000 - k
    fit = stats.bradley_terry(wins)
    # log-strength differences have a standard error of about 0.03 with 3,000 games a pair.
    err = np.log(fit / fit[0]) - np.log(truth / truth[0])
    assert np.abs(err).max() < 0.12, err


def test_bradley_terry_two_models_closed_form_and_likelihood_equations():
    fit = stats.bradley_terry(np.array([[0.0, 7.0], [3.0, 0.0]]))
    assert fit[0] / fit[1] == pytest.approx(7 / 3, rel=1e-9)
    # Random data: the MLE satisfies W_i = Σ_j n_ij p_i / (p_i + p_j) (Hunter 2004, eq. 2).
    rng = np.random.default_rng(1)
    wins = rng.integers(1, 20, size=(5, 5)).astype(float)
    np.fill_diagonal(wins, 0.0)
    p = stats.bradley_terry(wins)
    n = wins + wins.T
    expected = (n * p[:, None] / (p[:, None] + p[None, :])).sum(axis=1)
    np.testing.assert_allclose(expected, wins.sum(axis=1), rtol=1e-7)


def test_bradley_terry_prior_keeps_a_winless_model_finite():
    wins = np.array([[0.0, 5.0], [0.0, 0.0]])
    assert stats.bradley_terry(wins, max_iter=200)[1] < 1e-3  # the MLE runs off to zero
    shrunk = stats.bradley_terry(wins, prior=1.0)
    # One virtual tie: 5.5 points against 0.5, a closed form again.
    assert shrunk[0] / shrunk[1] == pytest.approx(11.0, rel=1e-9)


def test_elo_scale_matches_bradley_terry_odds():
    r = stats.to_elo_scale(np.array([1.0, 10.0]))
    assert r[1] - r[0] == pytest.approx(400.0)


def judgments(outcomes, models=("x", "y")):
    return [Judgment(i, "ann", models[0], models[1], o) for i, o in enumerate(outcomes)]


def test_win_rates_count_ties_as_half():
    rows = {r["model"]: r for r in stats.win_rates(judgments(["a", "a", "b", "tie"]), ["x", "y"])}
    assert rows["x"]["wins"] == 2 and rows["x"]["losses"] == 1 and rows["x"]["ties"] == 1
    assert rows["x"]["win_rate"] == pytest.approx(2.5 / 4)
    assert rows["y"]["win_rate"] == pytest.approx(1.5 / 4)


def test_online_elo_is_zero_sum_and_moves_k_over_two_between_equals():
    r = stats.elo(judgments(["a"]), ["x", "y"], k=32)
    assert r["x"] == pytest.approx(1016.0) and r["y"] == pytest.approx(984.0)
    r = stats.elo(judgments(["a", "b", "a", "tie", "both_bad", "a"]), ["x", "y"])
    assert r["x"] + r["y"] == pytest.approx(2000.0)


def test_bootstrap_interval_contains_point_estimate():
    js = judgments(["a"] * 30 + ["b"] * 10 + ["tie"] * 5)
    low, high = stats.bootstrap_bt(js, ["x", "y"], n_boot=100)
    point = stats.to_elo_scale(stats.bradley_terry(stats.head_to_head(js, ["x", "y"]), prior=1.0))
    assert low[0] < point[0] < high[0] and low[1] < point[1] < high[1]
    assert high[0] - low[0] > 10  # 45 games leave real uncertainty


def test_cohen_kappa_matches_the_published_example():
    # Wikipedia's "Cohen's kappa" example: 50 proposals, both say yes on 20, both no on 15,
    # A yes / B no on 5, A no / B yes on 10: p_o = 0.7, p_e = 0.5, κ = 0.4.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_matches_scikit_learn():
    """Needs the `interop` extra (scikit-learn); mandatory under `.ci/run`."""
    sklearn_metrics = require_interop("sklearn.metrics", "scikit-learn")
    rng = np.random.default_rng(2)
    a = list(rng.choice(stats.OUTCOMES, 60))
    b = [x if rng.random() < 0.6 else rng.choice(stats.OUTCOMES) for x in a]
    assert stats.cohen_kappa(a, b) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b))


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971)-style worked example: 10 items, 14 raters, 5 categories; κ = 0.210
    # (P̄ = 0.378, P_e = 0.213), as tabulated in Wikipedia's "Fleiss' kappa" article.
    table = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert stats.fleiss_kappa(table) == pytest.approx(0.2099, abs=5e-4)


def test_agreement_uses_items_judged_by_several_annotators():
    js = [
        Judgment(1, "ann1", "x", "y", "a"),
        Judgment(1, "ann2", "x", "y", "a"),
        Judgment(2, "ann1", "x", "y", "b"),
        Judgment(2, "ann2", "x", "y", "b"),
        Judgment(3, "ann1", "x", "y", "tie"),  # judged once: not part of agreement
    ]
    ag = stats.agreement(js)
    assert ag["n_items"] == 2 and ag["raters"] == 2
    assert ag["fleiss_kappa"] == pytest.approx(1.0)
    assert ag["pairs"][0]["kappa"] == pytest.approx(1.0) and ag["pairs"][0]["n_items"] == 2
