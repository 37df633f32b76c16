"""Choosing one artifact per device (or target) from measured numbers.

1. Constraints filter: size, p90 latency, peak resident memory, quality loss versus the float32
   source. Limits are inclusive; an unset limit is not checked.
2. The objective ranks what is left, lexicographically (the id breaks full ties):
   best quality (quality, size, p90), lowest latency (p90, quality, size), smallest (size, quality, p90).
3. Beside the choice, the Pareto front of (size, p90, quality) over every measured candidate — also
   the rejected ones, so the front shows what the constraints cost.

Every candidate that is not chosen gets a verdict that says why, with both numbers: the constraints it
broke, the eligible candidate that dominates it, or what the chosen one did better. When nothing is
eligible, the nearest misses name the rejected candidates that came closest.
"""
from __future__ import annotations

import dataclasses
import enum
import math


class Objective(enum.Enum):
    BEST_QUALITY = "best_quality"
    LOWEST_LATENCY = "lowest_latency"
    SMALLEST = "smallest"


class Status(enum.Enum):
    CHOSEN = "chosen"
    ELIGIBLE = "eligible"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Measured:
    candidate_id: str
    size_bytes: int
    quality: float                  # lower is better (perplexity)
    quality_loss_pct: float         # 100·(quality − baseline)/baseline
    p90_ms: float
    error: str = ""                 # set when the candidate could not be made or measured
    peak_rss_bytes: int = 0         # VmHWM of the measuring process; 0 = the agent did not report it


@dataclasses.dataclass(frozen=True)
class Budget:
    max_size_bytes: int | None = None
    max_p90_latency_ms: float | None = None
    max_quality_loss_pct: float | None = None
    max_peak_memory_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    candidate_id: str
    status: Status
    reason: str                     # empty for the chosen one
    pareto: bool = False            # on the (size, p90, quality) front of the measured candidates
    dominated_by: tuple[str, ...] = ()   # ids of the candidates dominating this one, best-ranked first


@dataclasses.dataclass(frozen=True)
class Selection:
    chosen: str | None              # None: no candidate met the constraints
    verdicts: list[Verdict]         # one per candidate, in input order
    nearest_misses: list[str]       # "<id>: <what it broke>", closest first; empty when something was chosen


@dataclasses.dataclass(frozen=True)
class _Miss:
    """One broken constraint: the sentence for humans and how far over the limit, relative to it."""
    text: str
    excess: float


_NEAREST_MISSES = 3


def _mb(size_bytes: float) -> str:
    return f"{size_bytes / 1e6:.1f} MB"


def _apart(value: float, limit: float, decimals: int, scale: float = 1.0) -> tuple[str, str]:
    """Both numbers with enough decimals that the larger one visibly exceeds the other."""
    for places in range(decimals, decimals + 8):
        shown = (f"{value / scale:.{places}f}", f"{limit / scale:.{places}f}")
        if shown[0] != shown[1]:
            return shown
    return f"{value / scale!r}", f"{limit / scale!r}"


def _relative_excess(value: float, limit: float) -> float:
    """(value − limit)/|limit|, i.e. value/limit − 1 for a positive limit; any excess over 0 is infinite."""
    return (value - limit) / abs(limit) if limit else math.inf


def _misses(m: Measured, budget: Budget) -> list[_Miss]:
    misses = []
    if budget.max_size_bytes is not None and m.size_bytes > budget.max_size_bytes:
        size, limit = _apart(m.size_bytes, budget.max_size_bytes, 1, 1e6)
        misses.append(_Miss(f"size {size} MB > max_size_bytes {limit} MB",
                            _relative_excess(m.size_bytes, budget.max_size_bytes)))
    if budget.max_p90_latency_ms is not None and m.p90_ms > budget.max_p90_latency_ms:
        p90, limit = _apart(m.p90_ms, budget.max_p90_latency_ms, 1)
        misses.append(_Miss(f"p90 latency {p90} ms > max_p90_latency_ms {limit} ms",
                            _relative_excess(m.p90_ms, budget.max_p90_latency_ms)))
    if budget.max_quality_loss_pct is not None and m.quality_loss_pct > budget.max_quality_loss_pct:
        loss, limit = _apart(m.quality_loss_pct, budget.max_quality_loss_pct, 2)
        misses.append(_Miss(f"quality loss {loss}% > max_quality_loss_pct {limit}%",
                            _relative_excess(m.quality_loss_pct, budget.max_quality_loss_pct)))
    if budget.max_peak_memory_bytes is not None:
        if m.peak_rss_bytes <= 0:        # a budget we cannot check is not met
            misses.append(_Miss(f"peak memory not measured; max_peak_memory_bytes "
                                f"{_mb(budget.max_peak_memory_bytes)}", math.inf))
        elif m.peak_rss_bytes > budget.max_peak_memory_bytes:
            peak, limit = _apart(m.peak_rss_bytes, budget.max_peak_memory_bytes, 1, 1e6)
            misses.append(_Miss(f"peak memory {peak} MB > max_peak_memory_bytes {limit} MB",
                                _relative_excess(m.peak_rss_bytes, budget.max_peak_memory_bytes)))
    return misses


def broken_constraints(m: Measured, budget: Budget) -> list[str]:
    """Every constraint m breaks, each with the measured value and the limit."""
    return [miss.text for miss in _misses(m, budget)]


def _rank(m: Measured, objective: Objective) -> tuple:
    if objective is Objective.LOWEST_LATENCY:
        return (m.p90_ms, m.quality, m.size_bytes, m.candidate_id)
    if objective is Objective.SMALLEST:
        return (m.size_bytes, m.quality, m.p90_ms, m.candidate_id)
    return (m.quality, m.size_bytes, m.p90_ms, m.candidate_id)


def dominates(a: Measured, b: Measured) -> bool:
    """a is at least as good as b on size, p90 and quality, and better on at least one."""
    at_least = a.size_bytes <= b.size_bytes and a.p90_ms <= b.p90_ms and a.quality <= b.quality
    better = a.size_bytes < b.size_bytes or a.p90_ms < b.p90_ms or a.quality < b.quality
    return at_least and better


def _comparison(better: Measured, worse: Measured) -> str:
    """What `better` does better than (or as well as) `worse`, on size, p90 and quality, with both numbers."""
    parts = []
    if better.size_bytes < worse.size_bytes:
        parts.append("smaller {} vs {} MB".format(*_apart(better.size_bytes, worse.size_bytes, 1, 1e6)))
    else:
        parts.append(f"same size {_mb(better.size_bytes)}")
    if better.p90_ms < worse.p90_ms:
        parts.append("faster p90 {} vs {} ms".format(*_apart(better.p90_ms, worse.p90_ms, 1)))
    else:
        parts.append(f"same p90 {better.p90_ms:.1f} ms")
    if better.quality < worse.quality:
        parts.append("better quality {} vs {}".format(*_apart(better.quality, worse.quality, 3)))
    else:
        parts.append(f"same quality {better.quality:.3f}")
    return ", ".join(parts)


def _lost_to(m: Measured, winner: Measured, objective: Objective) -> str:
    """Why a non-dominated eligible candidate lost: the first key of the objective's order that differs."""
    if objective is Objective.LOWEST_LATENCY and m.p90_ms != winner.p90_ms:
        return "{} is faster (p90 {} ms vs {} ms)".format(winner.candidate_id, *_apart(winner.p90_ms, m.p90_ms, 1))
    if objective is Objective.SMALLEST and m.size_bytes != winner.size_bytes:
        return "{} is smaller ({} MB vs {} MB)".format(winner.candidate_id,
                                                       *_apart(winner.size_bytes, m.size_bytes, 1, 1e6))
    if m.quality != winner.quality:
        return "{} has better quality ({} vs {})".format(winner.candidate_id, *_apart(winner.quality, m.quality, 3))
    if m.size_bytes != winner.size_bytes:
        return "same quality; {} is smaller ({} MB vs {} MB)".format(
            winner.candidate_id, *_apart(winner.size_bytes, m.size_bytes, 1, 1e6))
    if m.p90_ms != winner.p90_ms:
        return "same quality and size; {} is faster (p90 {} ms vs {} ms)".format(
            winner.candidate_id, *_apart(winner.p90_ms, m.p90_ms, 1))
    return f"tied with {winner.candidate_id}; ordered by id"


def _nearest_misses(rejected: list[tuple[Measured, list[_Miss]]], objective: Objective) -> list[str]:
    """The rejected candidates closest to the limits: sum of relative excess, then the objective's order."""
    def distance(item: tuple[Measured, list[_Miss]]) -> tuple:
        m, misses = item
        return (sum(miss.excess for miss in misses), _rank(m, objective))
    closest = sorted(rejected, key=distance)[:_NEAREST_MISSES]
    return [f"{m.candidate_id}: " + "; ".join(miss.text for miss in misses) for m, misses in closest]


def select(measured: list[Measured], budget: Budget,
           objective: Objective = Objective.BEST_QUALITY) -> Selection:
    """The chosen candidate (or None), a verdict for every candidate in input order, and the nearest misses."""
    ranked = sorted((m for m in measured if not m.error), key=lambda m: _rank(m, objective))
    dominators = {m.candidate_id: tuple(d.candidate_id for d in ranked if dominates(d, m)) for m in ranked}
    misses = {m.candidate_id: _misses(m, budget) for m in ranked}
    eligible = [m for m in ranked if not misses[m.candidate_id]]            # best-ranked first
    eligible_ids = {m.candidate_id for m in eligible}
    by_id = {m.candidate_id: m for m in ranked}
    winner = eligible[0] if eligible else None

    verdicts = []
    for m in measured:
        if m.error:
            verdicts.append(Verdict(m.candidate_id, Status.FAILED, f"failed: {m.error}"))
            continue
        dominated_by = dominators[m.candidate_id]
        front = {"pareto": not dominated_by, "dominated_by": dominated_by}
        if misses[m.candidate_id]:
            verdicts.append(Verdict(m.candidate_id, Status.REJECTED,
                                    "; ".join(miss.text for miss in misses[m.candidate_id]), **front))
        elif m is winner:
            verdicts.append(Verdict(m.candidate_id, Status.CHOSEN, "", **front))
        else:
            # Only an eligible dominator is a reason: a rejected one could not have been chosen either.
            # The first in rank order is the winner itself whenever the winner dominates m.
            beaten_by = next((by_id[d] for d in dominated_by if d in eligible_ids), None)
            reason = (f"dominated by {beaten_by.candidate_id} ({_comparison(beaten_by, m)})" if beaten_by
                      else _lost_to(m, winner, objective))
            verdicts.append(Verdict(m.candidate_id, Status.ELIGIBLE, reason, **front))
    rejected = [(m, misses[m.candidate_id]) for m in ranked if misses[m.candidate_id]]
    nearest = [] if winner else _nearest_misses(rejected, objective)
    return Selection(winner.candidate_id if winner else None, verdicts, nearest)
