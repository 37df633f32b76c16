"""bench/load.py's checks and numbers: every job run exactly once (the coordinator's database and the
agents' own records), latency percentiles per RPC and phase, and the printed tables."""
from __future__ import annotations

import collections
import math
import os
import platform
import subprocess
from pathlib import Path

from shared.store.database import open_database


# ---------------------------------------------------------------------- checks and numbers
def check_jobs(db_path: Path, builds: list[dict], records: list[dict], candidates: int) -> dict:
    """No job lost, none run twice: the coordinator's database and the agents' own calls, job by job."""
    ids = [b["name"].removeprefix("builds/") for b in builds if b["name"]]
    db = open_database(db_path)            # the coordinator's --database: a SQLite path or a postgresql:// URL
    try:
        jobs = {r["id"]: dict(r) for r in db.query(
            f"SELECT id, build_id, candidate_id, target, state, attempts, create_time FROM jobs "
            f"WHERE build_id IN ({','.join('?' * len(ids))})", ids)}
        leases = [dict(r) for r in db.query("SELECT id, job_id, device_id, state FROM leases")]
    finally:
        db.close()
    by_key = {(f"builds/{j['build_id']}", j["candidate_id"], j["target"]): job_id for job_id, j in jobs.items()}
    lease_job = {f"leases/{lease['id']}": lease["job_id"] for lease in leases}
    failures = []
    for build in builds:
        if build["state"] != "BUILD_STATE_SUCCEEDED":
            failures.append(f"{build['name'] or 'a build'} ended {build['state']}: {build['error']}")
    expected = len(builds) * candidates
    if len(jobs) != expected:
        failures.append(f"{len(jobs)} jobs in the database for {len(builds)} builds × {candidates} candidates; "
                        f"expected {expected}")
    count = {job_id: {"db_leases": 0, "db_reported": 0, "agent_leases": 0, "agent_accepted": 0, "agent_reports": 0}
             for job_id in jobs}
    for lease in leases:
        if lease["job_id"] in count:
            count[lease["job_id"]]["db_leases"] += 1
            count[lease["job_id"]]["db_reported"] += lease["state"] == "REPORTED"
    for record in records:
        if record["method"] == "LeaseJob" and "lease" in record:
            job_id = by_key.get((record["build"], record["candidate"], record["target"]))
            if job_id is None:
                failures.append(f"an agent leased {record['lease']} for a job not in the database: {record}")
            elif lease_job.get(record["lease"]) != job_id:
                failures.append(f"{record['lease']} is not a lease of job {job_id} in the database")
            else:
                count[job_id]["agent_leases"] += 1
        elif record["method"] == "ReportResult" and record["code"] == "OK":
            job_id = lease_job.get(record["lease"])
            if job_id in count:
                count[job_id]["agent_reports"] += 1
                count[job_id]["agent_accepted"] += record["accepted"]
    exactly_once = 0
    for job_id, job in jobs.items():
        seen = count[job_id]
        if job["state"] == "SUCCEEDED" and job["attempts"] == 1 and seen["db_leases"] == seen["db_reported"] == 1 \
                and seen["agent_leases"] == seen["agent_accepted"] == 1:
            exactly_once += 1
        else:
            failures.append(f"job {job_id} ({job['build_id']} {job['candidate_id']}): state {job['state']}, "
                            f"attempts {job['attempts']}, {seen}")
    errors = [r for r in records if r["method"] == "ReportResult" and r.get("outcome") == "error"]
    failures += [f"{r['lease']} was reported as an error: {r['error']}" for r in errors]
    totals = {key: sum(c[key] for c in count.values()) for key in next(iter(count.values()), {})}
    return {"builds": len(builds), "builds_succeeded": sum(b["state"] == "BUILD_STATE_SUCCEEDED" for b in builds),
            "jobs_expected": expected, "jobs_in_database": len(jobs),
            "jobs_succeeded": sum(j["state"] == "SUCCEEDED" for j in jobs.values()), "jobs_run_exactly_once": exactly_once,
            "jobs_with_more_than_one_attempt": sum(j["attempts"] > 1 for j in jobs.values()),
            "report_calls_not_accepted": sum(c["agent_reports"] - c["agent_accepted"] for c in count.values()),
            "devices_that_measured": len({lease["device_id"] for lease in leases if lease["job_id"] in jobs}),
            "totals": totals, "failures": failures, "create_time": {j: jobs[j]["create_time"] for j in jobs},
            "lease_job": {name: job_id for name, job_id in lease_job.items() if job_id in jobs}}


def percentiles(values: list[float]) -> dict:
    """Nearest-rank percentiles, in ms."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(math.ceil(q * len(ordered)) - 1, 0))]
    return {"count": len(ordered), "p50_ms": round(at(0.5), 2), "p90_ms": round(at(0.9), 2),
            "p99_ms": round(at(0.99), 2), "max_ms": round(ordered[-1], 2)}


def latency_rows(driver: list[dict], agents: list[dict], probe: list[dict], jobs: dict, idle: tuple,
                 builds: tuple) -> list[dict]:
    """Per control RPC and phase: the idle fleet (`idle`, wall seconds), the builds (`builds`), or the
    fleet's start-up (RegisterAgent). A call belongs to the phase it ended in (long-polls start earlier)."""
    def ok(rows, method, window=None):
        return [r for r in rows if r["method"] == method and r.get("code", "OK") == "OK"
                and (window is None or window[0] <= r["start"] + r["ms"] / 1000 <= window[1])]

    def failed(rows, method, window=None):
        return sum(r["method"] == method and r["code"] not in ("OK", "STOPPED")
                   and (window is None or window[0] <= r["end"] <= window[1]) for r in rows)
    during = [r for r in ok(agents, "LeaseJob", builds)]
    fleet = [r for r in agents if r["device"] != "load-probe"]
    rows = [("CreateBuild (all at once)", "builds", [r["ms"] for r in ok(driver, "CreateBuild")], 0),
            ("GetOperation (each build every 0.5 s)", "builds", [r["ms"] for r in ok(driver, "GetOperation")], 0),
            ("GetBuild", "builds", [r["ms"] for r in ok(driver, "GetBuild")], 0),
            ("RegisterAgent (the whole fleet at once)", "start-up", [r["ms"] for r in ok(fleet, "RegisterAgent")],
             failed(fleet, "RegisterAgent"))]
    for phase, window in (("idle", idle), ("builds", builds)):
        rows += [("Heartbeat", phase, [r["ms"] for r in ok(agents, "Heartbeat", window)],
                  failed(agents, "Heartbeat", window)),
                 ("LeaseJob, wait_ms=0 (the probe)", phase, [r["ms"] for r in ok(probe, "LeaseJob", window)],
                  failed(probe, "LeaseJob", window))]
    rows += [("LeaseJob dispatch: job created → lease in the agent", "builds",
              [1000 * (r["end"] - jobs["create_time"][jobs["lease_job"][r["lease"]]])
               for r in during if r.get("lease") in jobs["lease_job"]], failed(agents, "LeaseJob", builds)),
             ("LeaseJob without a job: time past wait_ms", "builds", [r["ms"] - r["wait_ms"] for r in during
                                                                      if "lease" not in r], 0),
             ("ReportResult", "builds", [r["ms"] for r in ok(agents, "ReportResult", builds)],
              failed(agents, "ReportResult", builds))]
    return [{"rpc": name, "phase": phase, **percentiles(values), "errors": errors}
            for name, phase, values, errors in rows]


def failures_by_code(records: list[dict], phases: dict[str, list[float]]) -> dict[str, int]:
    """Failed agent calls of the whole run by method, code and the phase they ended in (calls cut short by
    the agents' stop excluded)."""
    def phase(t: float) -> str:
        return next((name for name, (begin, end) in phases.items() if begin <= t <= end), "between phases")
    return dict(collections.Counter(f"{r['method']} {r['code']} ({phase(r['end'])})" for r in records
                                    if r["code"] not in ("OK", "STOPPED")))


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    from clients.agent.profile import cpu_model, ram_bytes
    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "ram_bytes": ram_bytes(), "arch": platform.machine(),
            "lscpu_head": [" ".join(line.split()) for line in lscpu], "gpu": "none"}


def versions() -> dict:
    import google.protobuf
    import grpc
    import llama_cpp
    return {"python": platform.python_version(), "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
            "llama_cpp_python": llama_cpp.__version__}


def table(result: dict) -> str:
    mib = lambda value: f"{value / (1 << 20):.0f} MiB"
    checks, memory = result["checks"], result["coordinator"]
    lines = [f"{result['builds']} builds × {result['candidates']} candidates, {result['agents']} agents in "
             f"{result['agent_processes']} processes, one coordinator process; measurements "
             f"{'one at a time (host lock)' if result['host_lock'] else 'all at once'}; builds' phase "
             f"{result['seconds']['builds']:.1f} s wall\n",
             "| control RPC (client side) | phase | calls | p50 ms | p90 ms | p99 ms | max ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["latency"]:
        numbers = " | ".join(f"{row[k]:.1f}" if row["count"] else "–" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        lines.append(f"| {row['rpc']} | {row['phase']} | {row['count']} | {numbers} | {row['errors']} |")
    totals = checks["totals"]
    lines += ["", "| check | value |", "|---|---|",
              f"| builds succeeded{' (the warm-up build included)' if 'warmup_build' in result else ''} "
              f"| {checks['builds_succeeded']} / {checks['builds']} |",
              f"| jobs in the database / expected | {checks['jobs_in_database']} / {checks['jobs_expected']} |",
              f"| jobs succeeded | {checks['jobs_succeeded']} |",
              f"| jobs run exactly once (one lease, reported; leased once and reported once by the agents) "
              f"| {checks['jobs_run_exactly_once']} |",
              f"| jobs leased more than once (attempts > 1) | {checks['jobs_with_more_than_one_attempt']} |",
              f"| agent side: leases received / accepted ReportResults | {totals.get('agent_leases', 0)} / "
              f"{totals.get('agent_accepted', 0)} |",
              f"| ReportResult calls not accepted (duplicates) | {checks['report_calls_not_accepted']} |",
              f"| distinct devices that measured | {checks['devices_that_measured']} |",
              f"| failures | {len(checks['failures'])} |",
              f"| agent calls that failed, by code (whole run) | "
              f"{', '.join(f'{k}: {v}' for k, v in result['agent_call_failures'].items()) or 'none'} |",
              "", "| coordinator process | value |", "|---|---|",
              f"| peak RSS, `/usr/bin/time -v` maximum resident set size | {mib(memory['time_v_max_rss_bytes'])} |"]
    for phase, sample in memory["phases"].items():
        lines.append(f"| {phase}: VmHWM · VmRSS · CPU s | {mib(sample['vm_hwm_bytes'])} · {mib(sample['vm_rss_bytes'])}"
                     f" · {sample['cpu_s']:.1f} |")
    lines += [f"| CPU, idle fleet ({result['agents']} agents long-polling, nothing queued; the probe's "
              f"4 LeaseJob/s) | {memory['cpu_pct']['idle']:.0f} % of one core |",
              f"| CPU, during the builds | {memory['cpu_pct']['builds']:.0f} % of one core |",
              f"| write syscalls/s · bytes to storage/s, idle · builds | "
              f"{memory['writes_per_s']['idle']['syscw']} · {memory['writes_per_s']['idle']['write_bytes'] / 1e6:.1f} MB"
              f" · {memory['writes_per_s']['builds']['syscw']} · "
              f"{memory['writes_per_s']['builds']['write_bytes'] / 1e6:.1f} MB |",
              f"| the whole machine's CPU busy (all processes, all {result['machine']['nproc']} cores), idle · builds "
              f"| {result['host_cpu_busy_pct']['idle']:.0f} % · {result['host_cpu_busy_pct']['builds']:.0f} % |",
              "", "| wall time | s |", "|---|---:|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in result["seconds"].items()]
    return "\n".join(lines)
