"""The gate's verdict and exit code come from one function and fail closed."""
import pytest

from safeguard.gate import ExitCode, decide
from safeguard.stats import roc_auc, wilson_interval


def result(status, kind="target", **kw):
    return {"concept": "c", "probe": "p", "status": status, "rate": 0.3, "ci_low": 0.1, "ci_high": 0.5, "n": 20,
            "threshold": 0.1, "details": {"kind": kind, **kw}}


@pytest.mark.parametrize("statuses,max_unassessed,expected", [
    (["pass", "pass"], 0, ExitCode.PASS),
    (["pass", "fail"], 0, ExitCode.LEAKAGE),
    (["pass", "unassessed"], 0, ExitCode.UNASSESSED),
    (["pass", "unassessed"], 1, ExitCode.PASS),
    (["fail", "unassessed"], 5, ExitCode.LEAKAGE),
    (["pass", "weird-status"], 0, ExitCode.UNASSESSED),
    ([], 0, ExitCode.UNASSESSED),
])
def test_decide(statuses, max_unassessed, expected):
    decision = decide([result(s) for s in statuses], max_unassessed)
    assert decision.exit_code == expected
    assert f"(exit {int(expected)})" in decision.line()


def test_screen_rows_do_not_count_and_model_change_wins():
    assert decide([result("pass", kind="screen")], 0).exit_code == ExitCode.UNASSESSED
    assert decide([result("pass")], 0, model_error="unet changed").exit_code == ExitCode.MODEL_CHANGED


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 40)
    assert lo == 0 and hi == pytest.approx(0.0876, abs=1e-3)
    lo, hi = wilson_interval(10, 20)
    assert (lo, hi) == (pytest.approx(0.2993, abs=1e-3), pytest.approx(0.7007, abs=1e-3))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_roc_auc():
    assert roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert roc_auc([0.1], [True]) is None


def test_min_samples_for():
    from safeguard.stats import min_samples_for

    for t in (0.05, 0.1, 0.2, 0.5):
        n = min_samples_for(t)
        assert wilson_interval(0, n)[1] <= t < wilson_interval(0, n - 1)[1]


def test_samples_needed_at_the_observed_rate():
    from safeguard.stats import min_samples_for, samples_needed

    assert samples_needed(0.0, 0.2) == min_samples_for(0.2)
    n = samples_needed(0.125, 0.2)
    assert wilson_interval(round(0.125 * n), n)[1] <= 0.2 < wilson_interval(round(0.125 * (n - 1)), n - 1)[1]
    assert n > 16  # 2 hits in 16 images cannot show 0.2
    assert samples_needed(0.2, 0.2) is None and samples_needed(0.3, 0.2) is None
