"""Scaling-law fitter: recovers known constants from synthetic runs."""

import math

import pytest

from lmforge.train.scaling import ScalingFit, fit_scaling_law, plot_scaling

TRUE = ScalingFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al.'s published fit


def synthetic(noise: float = 0.0):
    import random

    rng = random.Random(0)
    points = []
    for n in (1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9):
        for d in (1e8, 1e9, 1e10, 1e11):
            loss = TRUE.predict(n, d) * math.exp(rng.gauss(0, noise))
            points.append((n, d, loss))
    return points


def test_recovers_constants_from_exact_points():
    fit = fit_scaling_law(synthetic())
    assert fit.alpha == pytest.approx(0.34, abs=0.01)
    assert fit.beta == pytest.approx(0.28, abs=0.01)
    assert fit.E == pytest.approx(1.69, abs=0.02)
    assert fit.A == pytest.approx(406.4, rel=0.1)
    assert fit.B == pytest.approx(410.7, rel=0.1)


def test_robust_to_noise_and_an_outlier():
    points = synthetic(noise=0.005)
    n, d, loss = points[5]
    points[5] = (n, d, loss * 1.5)  # one diverged run
    fit = fit_scaling_law(points)
    assert fit.alpha == pytest.approx(0.34, abs=0.04)
    assert fit.beta == pytest.approx(0.28, abs=0.04)
    assert fit.E == pytest.approx(1.69, abs=0.1)
    opt = fit.compute_optimal(1e21)
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(1e21)


def test_parameters_only_law_and_plot(tmp_path):
    points = [{"params": n, "loss": 2.0 + 50.0 / n**0.3} for n in (1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8)]
    fit = fit_scaling_law(points)
    assert fit.B is None
    assert (fit.E, fit.A, fit.alpha) == (pytest.approx(2.0, abs=0.02), pytest.approx(50.0, rel=0.1), pytest.approx(0.3, abs=0.01))
    pytest.importorskip("matplotlib")
    path = plot_scaling(points, fit, str(tmp_path / "law.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_points():
    with pytest.raises(ValueError, match="at least"):
        fit_scaling_law([(1e6, 1e9, 3.0)] * 3)
    with pytest.raises(ValueError, match="positive"):
        fit_scaling_law([(1e6, 1e9, -1.0)] * 6)
