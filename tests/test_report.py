"""scripts/report.py's plots: a smoothed trend over the raw curve, a log axis where the loss spans decades."""

import pytest

from scripts import report


@pytest.fixture
def axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_smoothing_removes_a_saw_tooth_and_keeps_the_trend():
    steps = list(range(60))
    saw = [10.0 - 0.1 * i + (1.0 if i % 2 else -1.0) for i in steps]  # falling trend, +-1 teeth
    smooth = report.smoothed(steps, saw)
    assert len(smooth) == len(saw)
    assert max(abs(s - (10.0 - 0.1 * i)) for i, s in zip(steps, smooth)) < 0.5  # on the trend, ends included
    assert max(abs(b - a) for a, b in zip(smooth, smooth[1:])) < 0.5  # the teeth (2.0 apart) are gone


def test_smoothing_follows_a_straight_line_exactly_and_fits_logs_on_a_log_axis():
    steps = list(range(1, 40))
    assert report.smoothed(steps, [3.0 - 0.05 * s for s in steps]) == pytest.approx([3.0 - 0.05 * s for s in steps])
    decay = [8.0 * 0.8 ** s for s in steps]  # a straight line in log space
    assert report.smoothed(steps, decay, log=True) == pytest.approx(decay)


def test_loss_spanning_decades_gets_a_log_axis_and_a_smoothed_line(axes):
    history = [{"step": s, "loss": 8.0 * 0.9 ** s} for s in range(1, 60)]  # 7.2 -> 0.01
    report.plot_lines(axes, history, [("loss", "train", "-")], "SFT loss", "nats", log_if_decades=True)
    assert axes.get_yscale() == "log"
    assert [line.get_label() for line in axes.get_lines()] == ["train (raw)", "train (smoothed)"]


def test_a_narrow_range_or_few_points_stay_as_they_are(axes):
    history = [{"step": s, "loss": 1.0 + 0.01 * s, "eval_loss": 2.0} for s in range(1, 6)]
    report.plot_lines(axes, history, [("loss", "train", "-"), ("eval_loss", "held-out", "o-")], "SFT loss", "nats",
                      log_if_decades=True)
    assert axes.get_yscale() == "linear"
    assert [line.get_label() for line in axes.get_lines()] == ["train", "held-out"]  # 5 points: nothing to smooth
