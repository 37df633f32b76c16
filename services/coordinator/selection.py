"""Choosing one artifact per device from measured numbers.

Constraints filter (size, p90 latency, quality loss versus the float32 source); the objective ranks
what is left — best quality (ties: smaller file), or lowest p90 latency (ties: better quality).
Every candidate gets a verdict that says, with both numbers, why it was not chosen.
"""
from __future__ import annotations

import dataclasses
import enum


class Objective(enum.Enum):
    BEST_QUALITY = "best_quality"
    LOWEST_LATENCY = "lowest_latency"


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


@dataclasses.dataclass(frozen=True)
class Budget:
    max_size_bytes: int | None = None
    max_p90_latency_ms: float | None = None
    max_quality_loss_pct: float | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    candidate_id: str
    status: Status
    reason: str                     # empty for the chosen one


def _mb(size_bytes: float) -> str:
    return f"{size_bytes / 1e6:.1f} MB"


def _apart(value: float, limit: float, decimals: int, scale: float = 1.0) -> tuple[str, str]:
    """Both numbers with enough decimals that the larger one visibly exceeds the other."""
    for places in range(decimals, decimals + 8):
        shown = (f"{value / scale:.{places}f}", f"{limit / scale:.{places}f}")
        if shown[0] != shown[1]:
            return shown
    return f"{value / scale!r}", f"{limit / scale!r}"


def broken_constraints(m: Measured, budget: Budget) -> list[str]:
    broken = []
    if budget.max_size_bytes is not None and m.size_bytes > budget.max_size_bytes:
        size, limit = _apart(m.size_bytes, budget.max_size_bytes, 1, 1e6)
        broken.append(f"size {size} MB > max_size_bytes {limit} MB")
    if budget.max_p90_latency_ms is not None and m.p90_ms > budget.max_p90_latency_ms:
        p90, limit = _apart(m.p90_ms, budget.max_p90_latency_ms, 1)
        broken.append(f"p90 latency {p90} ms > max_p90_latency_ms {limit} ms")
    if budget.max_quality_loss_pct is not None and m.quality_loss_pct > budget.max_quality_loss_pct:
        loss, limit = _apart(m.quality_loss_pct, budget.max_quality_loss_pct, 2)
        broken.append(f"quality loss {loss}% > max_quality_loss_pct {limit}%")
    return broken


def _rank(m: Measured, objective: Objective) -> tuple:
    if objective is Objective.LOWEST_LATENCY:
        return (m.p90_ms, m.quality, m.size_bytes, m.candidate_id)
    return (m.quality, m.size_bytes, m.p90_ms, m.candidate_id)


def _lost_to(m: Measured, winner: Measured, objective: Objective) -> str:
    if objective is Objective.LOWEST_LATENCY and m.p90_ms != winner.p90_ms:
        return f"{winner.candidate_id} is faster (p90 {winner.p90_ms:.1f} ms vs {m.p90_ms:.1f} ms)"
    if m.quality != winner.quality:
        return f"{winner.candidate_id} has better quality ({winner.quality:.3f} vs {m.quality:.3f})"
    if m.size_bytes != winner.size_bytes:
        return f"same quality; {winner.candidate_id} is smaller ({_mb(winner.size_bytes)} vs {_mb(m.size_bytes)})"
    return f"tied with {winner.candidate_id}; ordered by id"


def select(measured: list[Measured], budget: Budget,
           objective: Objective = Objective.BEST_QUALITY) -> tuple[str | None, list[Verdict]]:
    """Returns (chosen candidate id or None, a verdict for every candidate in input order)."""
    verdicts: dict[str, Verdict] = {}
    eligible = []
    for m in measured:
        if m.error:
            verdicts[m.candidate_id] = Verdict(m.candidate_id, Status.FAILED, f"failed: {m.error}")
            continue
        broken = broken_constraints(m, budget)
        if broken:
            verdicts[m.candidate_id] = Verdict(m.candidate_id, Status.REJECTED, "; ".join(broken))
        else:
            eligible.append(m)
    if not eligible:
        return None, [verdicts[m.candidate_id] for m in measured]
    winner = min(eligible, key=lambda m: _rank(m, objective))
    for m in eligible:
        if m is winner:
            verdicts[m.candidate_id] = Verdict(m.candidate_id, Status.CHOSEN, "")
        else:
            verdicts[m.candidate_id] = Verdict(m.candidate_id, Status.ELIGIBLE, _lost_to(m, winner, objective))
    return winner.candidate_id, [verdicts[m.candidate_id] for m in measured]
