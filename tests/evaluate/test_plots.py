"""Axis labels of the evaluation plots."""

import numpy as np
import pytest

from bumblebee_dist.evaluate import plots
from bumblebee_dist.evaluate.plots import plot_residuals, plot_score_distributions


@pytest.fixture
def saved_axes(monkeypatch):
    """Record the axes of every figure the plot functions save."""
    axes = []
    save = plots._save

    def record(figure, path):
        axes.extend(figure.axes)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", record)
    return axes


def test_residual_panels_labelled(tmp_path, saved_axes):
    rng = np.random.default_rng(0)
    residuals = {
        "mttbar_true": rng.uniform(350, 900, 50),
        "mttbar_relative": rng.normal(0, 0.1, 50),
        "nu_pt_relative": rng.normal(0, 0.3, 100),
        "nu_eta_difference": rng.normal(0, 0.5, 100),
        "nu_phi_difference": rng.normal(0, 0.5, 100),
        "num_incomplete": np.array(0),
    }
    path = plot_residuals(residuals, tmp_path / "residuals.png", "test")
    assert path.is_file()
    xlabels = [axis.get_xlabel() for axis in saved_axes]
    assert xlabels == ["m(ttbar): predicted / true - 1", "neutrino pT: predicted / true - 1",
                       "neutrino eta: predicted - true",
                       "neutrino phi: predicted - true, wrapped [rad]"]
    ylabels = [axis.get_ylabel() for axis in saved_axes]
    assert ylabels == ["events", "neutrinos", "neutrinos", "neutrinos"]


def test_score_axis_not_probability(tmp_path, saved_axes):
    labels = np.array([0, 1] * 20)
    scores = np.linspace(-0.2, 1.2, 40)
    plot_score_distributions(labels, scores, tmp_path / "scores.png", "test")
    xlabel = saved_axes[0].get_xlabel()
    assert "class-token regression output" in xlabel
    assert "slot 0" in xlabel
    assert "not a probability" in xlabel
