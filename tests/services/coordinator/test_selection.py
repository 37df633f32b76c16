"""Selection: constraints filter, the objective ranks, and every candidate gets a verdict."""
from __future__ import annotations

import re

import pytest

from services.coordinator.selection import Budget, Measured, Objective, Status, broken_constraints, select

MB = 1_000_000


def _m(candidate: str, size_mb: float = 10, quality: float = 10.0, loss: float = 1.0, p90: float = 50.0,
       error: str = "") -> Measured:
    return Measured(candidate, int(size_mb * MB), quality, loss, p90, error)


def _by_id(verdicts):
    return {v.candidate_id: v for v in verdicts}


def _assert_reasons(chosen, verdicts):
    for verdict in verdicts:
        if verdict.candidate_id == chosen:
            assert (verdict.status, verdict.reason) == (Status.CHOSEN, "")
        else:
            assert verdict.status is not Status.CHOSEN
            assert verdict.reason.strip(), f"{verdict.candidate_id} has no reason"


def test_best_quality_picks_the_lowest_perplexity():
    measured = [_m("q8", size_mb=20, quality=10.1), _m("q4", size_mb=10, quality=10.9),
                _m("f16", size_mb=40, quality=10.0)]
    chosen, verdicts = select(measured, Budget())
    assert chosen == "f16"
    assert [v.candidate_id for v in verdicts] == ["q8", "q4", "f16"]        # input order
    by_id = _by_id(verdicts)
    assert by_id["q8"].status is Status.ELIGIBLE
    assert "f16 has better quality" in by_id["q8"].reason
    assert "10.000" in by_id["q8"].reason and "10.100" in by_id["q8"].reason
    _assert_reasons(chosen, verdicts)


def test_best_quality_ties_go_to_the_smaller_file():
    measured = [_m("big", size_mb=30, quality=10.0, p90=1), _m("small", size_mb=12, quality=10.0, p90=99)]
    chosen, verdicts = select(measured, Budget(), Objective.BEST_QUALITY)
    assert chosen == "small"
    reason = _by_id(verdicts)["big"].reason
    assert "small is smaller" in reason and "12.0 MB" in reason and "30.0 MB" in reason


def test_full_tie_is_broken_by_id_and_says_so():
    chosen, verdicts = select([_m("b"), _m("a")], Budget())
    assert chosen == "a"
    assert _by_id(verdicts)["b"].reason == "tied with a; ordered by id"


def test_lowest_latency_picks_the_fastest():
    measured = [_m("accurate", quality=10.0, p90=80.0), _m("fast", quality=11.0, p90=20.0)]
    chosen, verdicts = select(measured, Budget(), Objective.LOWEST_LATENCY)
    assert chosen == "fast"
    reason = _by_id(verdicts)["accurate"].reason
    assert "fast is faster" in reason and "20.0 ms" in reason and "80.0 ms" in reason
    assert select(measured, Budget(), Objective.BEST_QUALITY)[0] == "accurate"


def test_lowest_latency_ties_go_to_better_quality():
    measured = [_m("worse", quality=11.0, p90=20.0), _m("better", quality=10.5, p90=20.0)]
    chosen, verdicts = select(measured, Budget(), Objective.LOWEST_LATENCY)
    assert chosen == "better"
    assert "better has better quality" in _by_id(verdicts)["worse"].reason


def test_constraints_reject_with_both_numbers():
    budget = Budget(max_size_bytes=15 * MB, max_p90_latency_ms=40.0, max_quality_loss_pct=2.0)
    measured = [_m("huge", size_mb=25, p90=10), _m("slow", p90=75.5), _m("lossy", loss=3.25, p90=10),
                _m("ok", size_mb=5, p90=10)]
    chosen, verdicts = select(measured, budget)
    assert chosen == "ok"
    by_id = _by_id(verdicts)
    assert by_id["huge"].status is Status.REJECTED
    assert by_id["huge"].reason == "size 25.0 MB > max_size_bytes 15.0 MB"
    assert by_id["slow"].reason == "p90 latency 75.5 ms > max_p90_latency_ms 40.0 ms"
    assert by_id["lossy"].reason == "quality loss 3.25% > max_quality_loss_pct 2.00%"
    _assert_reasons(chosen, verdicts)


def test_every_broken_constraint_is_listed():
    budget = Budget(max_size_bytes=1 * MB, max_p90_latency_ms=10.0, max_quality_loss_pct=0.5)
    broken = broken_constraints(_m("x", size_mb=2, p90=20, loss=1.0), budget)
    assert len(broken) == 3
    chosen, verdicts = select([_m("x", size_mb=2, p90=20, loss=1.0)], budget)
    assert chosen is None
    assert verdicts[0].reason == "; ".join(broken)


def test_limits_are_inclusive():
    budget = Budget(max_size_bytes=10 * MB, max_p90_latency_ms=50.0, max_quality_loss_pct=1.0)
    assert broken_constraints(_m("edge", size_mb=10, p90=50.0, loss=1.0), budget) == []


def test_zero_limits_are_enforced_not_ignored():
    assert broken_constraints(_m("x", size_mb=1), Budget(max_size_bytes=0)) == ["size 1.0 MB > max_size_bytes 0.0 MB"]


def test_a_constraint_winner_beats_a_better_rejected_candidate():
    measured = [_m("best-but-big", size_mb=50, quality=9.0), _m("fits", size_mb=5, quality=12.0)]
    chosen, verdicts = select(measured, Budget(max_size_bytes=10 * MB))
    assert chosen == "fits"
    assert _by_id(verdicts)["best-but-big"].status is Status.REJECTED


def test_failed_candidates_are_reported_and_never_chosen():
    measured = [_m("broken", quality=1.0, error="export crashed"), _m("works", quality=12.0)]
    chosen, verdicts = select(measured, Budget())
    assert chosen == "works"
    assert _by_id(verdicts)["broken"].status is Status.FAILED
    assert _by_id(verdicts)["broken"].reason == "failed: export crashed"
    _assert_reasons(chosen, verdicts)


def test_no_eligible_candidate_gives_none():
    measured = [_m("big", size_mb=100), _m("broken", error="timeout")]
    chosen, verdicts = select(measured, Budget(max_size_bytes=1 * MB))
    assert chosen is None
    assert [v.status for v in verdicts] == [Status.REJECTED, Status.FAILED]
    _assert_reasons(chosen, verdicts)


def test_no_candidates_at_all():
    assert select([], Budget()) == (None, [])


@pytest.mark.parametrize("objective", list(Objective))
def test_every_loser_has_a_reason(objective):
    measured = [_m(f"c{i}", size_mb=5 + i % 3, quality=10 + (i % 4) / 10, p90=20 + i % 5, loss=i / 4)
                for i in range(12)] + [_m("dead", error="no device")]
    chosen, verdicts = select(measured, Budget(max_quality_loss_pct=2.0), objective)
    assert chosen is not None
    assert len(verdicts) == len(measured)
    assert sum(v.status is Status.CHOSEN for v in verdicts) == 1
    _assert_reasons(chosen, verdicts)


@pytest.mark.parametrize("measured, budget", [
    (_m("x", size_mb=1.00001), Budget(max_size_bytes=1 * MB)),
    (_m("x", p90=40.04), Budget(max_p90_latency_ms=40.0)),
    (_m("x", loss=2.001), Budget(max_quality_loss_pct=2.0)),
], ids=["size", "p90", "loss"])
def test_reason_numbers_show_the_violation(measured, budget):
    (reason,) = broken_constraints(measured, budget)
    shown, limit = (re.findall(r"\d+(?:\.\d+)?", part)[-1] for part in reason.split(" > "))
    assert float(shown) > float(limit), reason
