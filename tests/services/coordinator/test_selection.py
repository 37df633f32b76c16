"""Selection: constraints filter, the objective ranks, the Pareto front is marked, every candidate gets a
verdict, and an empty choice lists the nearest misses."""
from __future__ import annotations

import re

import pytest

from services.coordinator.selection import (Budget, Measured, Objective, Selection, Status, broken_constraints,
                                            dominates, select)

MB = 1_000_000


def _m(candidate: str, size_mb: float = 10, quality: float = 10.0, loss: float = 1.0, p90: float = 50.0,
       error: str = "", peak_mb: float = 100) -> Measured:
    return Measured(candidate, int(size_mb * MB), quality, loss, p90, error, int(peak_mb * MB))


def _unpack(selection: Selection):
    return selection.chosen, selection.verdicts, selection.nearest_misses


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
    chosen, verdicts, _ = _unpack(select(measured, Budget()))
    assert chosen == "f16"
    assert [v.candidate_id for v in verdicts] == ["q8", "q4", "f16"]        # input order
    by_id = _by_id(verdicts)
    assert by_id["q8"].status is Status.ELIGIBLE
    assert "f16 has better quality" in by_id["q8"].reason
    assert "10.000" in by_id["q8"].reason and "10.100" in by_id["q8"].reason
    _assert_reasons(chosen, verdicts)


def test_best_quality_ties_go_to_the_smaller_file():
    measured = [_m("big", size_mb=30, quality=10.0, p90=1), _m("small", size_mb=12, quality=10.0, p90=99)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(), Objective.BEST_QUALITY))
    assert chosen == "small"
    reason = _by_id(verdicts)["big"].reason
    assert "small is smaller" in reason and "12.0 MB" in reason and "30.0 MB" in reason


def test_full_tie_is_broken_by_id_and_says_so():
    chosen, verdicts, _ = _unpack(select([_m("b"), _m("a")], Budget()))
    assert chosen == "a"
    assert _by_id(verdicts)["b"].reason == "tied with a; ordered by id"


def test_lowest_latency_picks_the_fastest():
    measured = [_m("accurate", quality=10.0, p90=80.0), _m("fast", quality=11.0, p90=20.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(), Objective.LOWEST_LATENCY))
    assert chosen == "fast"
    reason = _by_id(verdicts)["accurate"].reason
    assert "fast is faster" in reason and "20.0 ms" in reason and "80.0 ms" in reason
    assert select(measured, Budget(), Objective.BEST_QUALITY).chosen == "accurate"


def test_lowest_latency_ties_go_to_better_quality():
    measured = [_m("worse", size_mb=5, quality=11.0, p90=20.0), _m("better", size_mb=10, quality=10.5, p90=20.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(), Objective.LOWEST_LATENCY))
    assert chosen == "better"
    assert _by_id(verdicts)["worse"].pareto                  # smaller, so not dominated: it lost on the objective
    assert "better has better quality" in _by_id(verdicts)["worse"].reason


def test_constraints_reject_with_both_numbers():
    budget = Budget(max_size_bytes=15 * MB, max_p90_latency_ms=40.0, max_quality_loss_pct=2.0)
    measured = [_m("huge", size_mb=25, p90=10), _m("slow", p90=75.5), _m("lossy", loss=3.25, p90=10),
                _m("ok", size_mb=5, p90=10)]
    chosen, verdicts, _ = _unpack(select(measured, budget))
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
    chosen, verdicts, _ = _unpack(select([_m("x", size_mb=2, p90=20, loss=1.0)], budget))
    assert chosen is None
    assert verdicts[0].reason == "; ".join(broken)


def test_limits_are_inclusive():
    budget = Budget(max_size_bytes=10 * MB, max_p90_latency_ms=50.0, max_quality_loss_pct=1.0)
    assert broken_constraints(_m("edge", size_mb=10, p90=50.0, loss=1.0), budget) == []


def test_zero_limits_are_enforced_not_ignored():
    assert broken_constraints(_m("x", size_mb=1), Budget(max_size_bytes=0)) == ["size 1.0 MB > max_size_bytes 0.0 MB"]


def test_a_constraint_winner_beats_a_better_rejected_candidate():
    measured = [_m("best-but-big", size_mb=50, quality=9.0), _m("fits", size_mb=5, quality=12.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(max_size_bytes=10 * MB)))
    assert chosen == "fits"
    assert _by_id(verdicts)["best-but-big"].status is Status.REJECTED


def test_failed_candidates_are_reported_and_never_chosen():
    measured = [_m("broken", quality=1.0, error="export crashed"), _m("works", quality=12.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget()))
    assert chosen == "works"
    assert _by_id(verdicts)["broken"].status is Status.FAILED
    assert _by_id(verdicts)["broken"].reason == "failed: export crashed"
    _assert_reasons(chosen, verdicts)


def test_no_eligible_candidate_gives_none():
    measured = [_m("big", size_mb=100), _m("broken", error="timeout")]
    chosen, verdicts, _ = _unpack(select(measured, Budget(max_size_bytes=1 * MB)))
    assert chosen is None
    assert [v.status for v in verdicts] == [Status.REJECTED, Status.FAILED]
    _assert_reasons(chosen, verdicts)


def test_no_candidates_at_all():
    assert select([], Budget()) == Selection(None, [], [])


@pytest.mark.parametrize("objective", list(Objective))
def test_every_loser_has_a_reason(objective):
    measured = [_m(f"c{i}", size_mb=5 + i % 3, quality=10 + (i % 4) / 10, p90=20 + i % 5, loss=i / 4)
                for i in range(12)] + [_m("dead", error="no device")]
    chosen, verdicts, _ = _unpack(select(measured, Budget(max_quality_loss_pct=2.0), objective))
    assert chosen is not None
    assert len(verdicts) == len(measured)
    assert sum(v.status is Status.CHOSEN for v in verdicts) == 1
    _assert_reasons(chosen, verdicts)


@pytest.mark.parametrize("measured, budget", [
    (_m("x", size_mb=1.00001), Budget(max_size_bytes=1 * MB)),
    (_m("x", p90=40.04), Budget(max_p90_latency_ms=40.0)),
    (_m("x", loss=2.001), Budget(max_quality_loss_pct=2.0)),
    (_m("x", peak_mb=400.00001), Budget(max_peak_memory_bytes=400 * MB)),
], ids=["size", "p90", "loss", "peak"])
def test_reason_numbers_show_the_violation(measured, budget):
    (reason,) = broken_constraints(measured, budget)
    shown, limit = (re.findall(r"\d+(?:\.\d+)?", part)[-1] for part in reason.split(" > "))
    assert float(shown) > float(limit), reason


# ---------------------------------------------------------------- peak memory

def test_peak_memory_rejects_with_both_numbers():
    measured = [_m("hungry", peak_mb=512.3, quality=9.0), _m("lean", peak_mb=300, quality=11.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(max_peak_memory_bytes=400 * MB)))
    assert chosen == "lean"
    hungry = _by_id(verdicts)["hungry"]
    assert hungry.status is Status.REJECTED
    assert hungry.reason == "peak memory 512.3 MB > max_peak_memory_bytes 400.0 MB"


def test_peak_memory_limit_is_inclusive_and_unset_is_unchecked():
    assert broken_constraints(_m("edge", peak_mb=400), Budget(max_peak_memory_bytes=400 * MB)) == []
    assert broken_constraints(_m("huge", peak_mb=10_000), Budget()) == []


def test_unreported_peak_memory_cannot_meet_a_memory_budget():
    (reason,) = broken_constraints(_m("blind", peak_mb=0), Budget(max_peak_memory_bytes=400 * MB))
    assert reason == "peak memory not measured; max_peak_memory_bytes 400.0 MB"
    assert broken_constraints(_m("blind", peak_mb=0), Budget()) == []


def test_every_broken_constraint_is_listed_in_proto_order():
    budget = Budget(max_size_bytes=1 * MB, max_p90_latency_ms=10.0, max_quality_loss_pct=0.5,
                    max_peak_memory_bytes=50 * MB)
    broken = broken_constraints(_m("x", size_mb=2, p90=20, loss=1.0, peak_mb=60), budget)
    prefixes = ["size ", "p90 latency ", "quality loss ", "peak memory "]
    assert len(broken) == 4 and all(b.startswith(p) for b, p in zip(broken, prefixes)), broken


# ---------------------------------------------------------------- smallest

def test_smallest_picks_the_smallest_file():
    measured = [_m("q8", size_mb=20, quality=10.1, p90=30), _m("q4", size_mb=10.5, quality=10.9, p90=40),
                _m("f16", size_mb=40, quality=10.0, p90=20)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(), Objective.SMALLEST))
    assert chosen == "q4"
    reason = _by_id(verdicts)["q8"].reason
    assert reason == "q4 is smaller (10.5 MB vs 20.0 MB)"
    _assert_reasons(chosen, verdicts)


def test_smallest_ties_go_to_better_quality_then_latency_then_id():
    measured = [_m("worse", size_mb=10, quality=11.0, p90=5), _m("better", size_mb=10, quality=10.5, p90=90)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(), Objective.SMALLEST))
    assert chosen == "better"
    assert _by_id(verdicts)["worse"].reason == "better has better quality (10.500 vs 11.000)"
    measured = [_m("slow", size_mb=10, quality=10.0, p90=60.0), _m("quick", size_mb=10, quality=10.0, p90=30.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(), Objective.SMALLEST))
    assert chosen == "quick"
    assert _by_id(verdicts)["slow"].reason.startswith("dominated by quick")
    assert select([_m("b"), _m("a")], Budget(), Objective.SMALLEST).chosen == "a"


# ---------------------------------------------------------------- Pareto front

def test_dominated_candidate_names_its_dominator_with_numbers():
    measured = [_m("f16", size_mb=50.3, quality=10.2, p90=80.0), _m("q8", size_mb=12.1, quality=10.1, p90=30.0)]
    chosen, verdicts, _ = _unpack(select(measured, Budget()))
    assert chosen == "q8"
    f16 = _by_id(verdicts)["f16"]
    assert (f16.status, f16.pareto, f16.dominated_by) == (Status.ELIGIBLE, False, ("q8",))
    assert f16.reason == "dominated by q8 (smaller 12.1 vs 50.3 MB, faster p90 30.0 vs 80.0 ms, " \
                         "better quality 10.100 vs 10.200)"
    assert _by_id(verdicts)["q8"].pareto and _by_id(verdicts)["q8"].dominated_by == ()


def test_dominated_reason_says_which_dimensions_are_equal():
    measured = [_m("a", size_mb=10, quality=10.0, p90=20.0), _m("b", size_mb=10, quality=10.0, p90=25.0)]
    b = _by_id(select(measured, Budget()).verdicts)["b"]
    assert b.reason == "dominated by a (same size 10.0 MB, faster p90 20.0 vs 25.0 ms, same quality 10.000)"


def test_dominated_by_is_sorted_by_the_objectives_rank():
    measured = [_m("worst", size_mb=30, quality=12.0, p90=90), _m("tiny", size_mb=5, quality=11.0, p90=80),
                _m("fast", size_mb=20, quality=11.5, p90=10), _m("sharp", size_mb=25, quality=9.0, p90=85)]
    for objective, order in [(Objective.BEST_QUALITY, ("sharp", "tiny", "fast")),
                             (Objective.LOWEST_LATENCY, ("fast", "tiny", "sharp")),
                             (Objective.SMALLEST, ("tiny", "fast", "sharp"))]:
        selection = select(measured, Budget(), objective)
        worst = _by_id(selection.verdicts)["worst"]
        assert worst.dominated_by == order, objective
        assert worst.reason.startswith(f"dominated by {order[0]} "), objective      # the chosen one
        assert selection.chosen == order[0]
        assert [v.candidate_id for v in selection.verdicts if v.pareto] == ["tiny", "fast", "sharp"]


def test_rejected_candidates_are_on_the_front_but_are_no_reason_to_lose():
    measured = [_m("big-best", size_mb=5, quality=9.0, p90=10, peak_mb=900),       # dominates both others
                _m("mid", size_mb=10, quality=10.0, p90=20), _m("low", size_mb=8, quality=11.0, p90=30)]
    chosen, verdicts, _ = _unpack(select(measured, Budget(max_peak_memory_bytes=500 * MB)))
    by_id = _by_id(verdicts)
    assert chosen == "mid"
    assert by_id["big-best"].status is Status.REJECTED and by_id["big-best"].pareto
    assert by_id["low"].dominated_by == ("big-best",) and not by_id["low"].pareto
    # Only a rejected candidate dominates "low": it lost on the objective, and the reason says so.
    assert by_id["low"].reason == "mid has better quality (10.000 vs 11.000)"
    assert by_id["mid"].dominated_by == ("big-best",)


def test_identical_candidates_do_not_dominate_each_other():
    chosen, verdicts, _ = _unpack(select([_m("b"), _m("a")], Budget()))
    assert all(v.pareto and v.dominated_by == () for v in verdicts)
    assert _by_id(verdicts)["b"].reason == "tied with a; ordered by id"


def test_failed_candidates_are_outside_the_front():
    measured = [_m("dead", size_mb=1, quality=1.0, p90=1.0, error="oom"), _m("alive", size_mb=50, quality=20, p90=90)]
    by_id = _by_id(select(measured, Budget()).verdicts)
    assert (by_id["dead"].pareto, by_id["dead"].dominated_by) == (False, ())
    assert (by_id["alive"].pareto, by_id["alive"].dominated_by) == (True, ())


@pytest.mark.parametrize("objective", list(Objective))
def test_front_agrees_with_brute_force_and_the_winner_is_never_dominated(objective):
    measured = [_m(f"c{i:02d}", size_mb=5 + (i * 7) % 9, quality=10 + ((i * 5) % 7) / 10, p90=20 + (i * 3) % 11,
                   loss=(i % 5) / 2) for i in range(30)]
    selection = select(measured, Budget(max_quality_loss_pct=1.5), objective)
    by_id = _by_id(selection.verdicts)
    for m in measured:
        slow = {d.candidate_id for d in measured if d is not m and dominates(d, m)}
        assert set(by_id[m.candidate_id].dominated_by) == slow
        assert by_id[m.candidate_id].pareto == (not slow)
    assert by_id[selection.chosen].dominated_by == () or all(
        by_id[d].status is Status.REJECTED for d in by_id[selection.chosen].dominated_by)
    eligible = {v.candidate_id for v in selection.verdicts if v.status in (Status.ELIGIBLE, Status.CHOSEN)}
    for verdict in selection.verdicts:
        if verdict.status is Status.ELIGIBLE and eligible & set(verdict.dominated_by):
            first = next(d for d in verdict.dominated_by if d in eligible)
            assert verdict.reason.startswith(f"dominated by {first} (")


def test_dominance_needs_one_strict_improvement():
    assert dominates(_m("a", p90=10), _m("b", p90=11))
    assert not dominates(_m("a"), _m("b"))
    assert not dominates(_m("a", size_mb=1, p90=90), _m("b", size_mb=2, p90=80))


# ---------------------------------------------------------------- nearest misses

def test_nearest_misses_are_ordered_by_relative_excess():
    budget = Budget(max_size_bytes=10 * MB, max_p90_latency_ms=100.0)
    measured = [_m("way-off", size_mb=30, p90=50),                # +200 %
                _m("close", size_mb=11, p90=50),                  # +10 %
                _m("two-small", size_mb=10.5, p90=108),           # +5 % +8 % = 13 %
                _m("dead", error="crashed"),
                _m("medium", size_mb=10, p90=150)]                # +50 %
    chosen, verdicts, nearest = _unpack(select(measured, budget))
    assert chosen is None
    assert nearest == ["close: size 11.0 MB > max_size_bytes 10.0 MB",
                       "two-small: size 10.5 MB > max_size_bytes 10.0 MB; "
                       "p90 latency 108.0 ms > max_p90_latency_ms 100.0 ms",
                       "medium: p90 latency 150.0 ms > max_p90_latency_ms 100.0 ms"]      # at most three
    for line in nearest:
        candidate, broke = line.split(": ", 1)
        assert _by_id(verdicts)[candidate].reason == broke


def test_nearest_miss_ties_follow_the_objective():
    budget = Budget(max_size_bytes=10 * MB)
    measured = [_m("fast", size_mb=12, quality=11.0, p90=10), _m("sharp", size_mb=12, quality=10.0, p90=90)]
    for objective, order in [(Objective.BEST_QUALITY, ["sharp", "fast"]),
                             (Objective.LOWEST_LATENCY, ["fast", "sharp"])]:
        assert [n.split(":")[0] for n in select(measured, budget, objective).nearest_misses] == order


def test_zero_limit_and_unmeasured_misses_sort_last():
    budget = Budget(max_size_bytes=10 * MB, max_peak_memory_bytes=100 * MB)
    measured = [_m("blind", size_mb=1, peak_mb=0), _m("far", size_mb=80)]
    assert [n.split(":")[0] for n in select(measured, budget).nearest_misses] == ["far", "blind"]


def test_no_nearest_misses_when_something_is_chosen_or_nothing_was_measured():
    assert select([_m("ok"), _m("big", size_mb=99)], Budget(max_size_bytes=20 * MB)).nearest_misses == []
    assert select([_m("dead", error="timeout")], Budget(max_size_bytes=1)).nearest_misses == []
