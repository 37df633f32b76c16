"""docs/examples/ci_gate.py as a CI pipeline runs it: a real process against a real coordinator and agent.
A lenient gate passes (exit 0, markdown summary, chosen artifacts written and downloaded); an
impossible one fails (exit 1) naming the target, the device and the broken budget; bad input exits 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sdk_builds import tiny_build

SCRIPT = Path(__file__).resolve().parents[3] / "docs" / "examples" / "ci_gate.py"


def ci_gate(coordinator, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFORGE_", "GITHUB_"))}
    environment.update(EDGEFORGE_ADDRESS=coordinator.address, EDGEFORGE_TOKEN=coordinator.admin_token,
                       OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=environment)


@pytest.mark.slow
def test_a_lenient_gate_passes_and_an_impossible_one_fails(coordinator, agent, build_yaml, tmp_path):
    summary, outputs = tmp_path / "step-summary.md", tmp_path / "github-output"
    chosen, downloads = tmp_path / "chosen.json", tmp_path / "models"
    passed = ci_gate(coordinator, str(build_yaml), "--max-quality-loss", "1000", "--max-p90-ms", "60000",
                     "--device", "host", "--artifacts-json", str(chosen), "--download", str(downloads),
                     env={"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(outputs)})
    assert passed.returncode == 0, passed.stderr
    assert "passed ✅" in passed.stdout and "| host | test-host | `gguf-q8_0` | gguf |" in passed.stdout
    assert "quality loss ≤ 1000%, p90 latency ≤ 60000 ms" in passed.stdout
    assert summary.read_text() == passed.stdout.removesuffix("\n")            # print() adds one newline
    assert "[100%] done" in passed.stderr and "uploaded model" in passed.stderr
    artifacts = json.loads(chosen.read_text())
    assert list(artifacts) == ["host"] and artifacts["host"].startswith("artifacts/")
    assert outputs.read_text() == f"artifacts={json.dumps(artifacts)}\n"
    assert (downloads / "host.gguf").read_bytes()[:4] == b"GGUF"

    failed = ci_gate(coordinator, str(build_yaml), "--max-p90-ms", "0.001")
    assert failed.returncode == 1, failed.stderr
    assert "failed ❌" in failed.stdout and "| host | test-host | none |" in failed.stdout
    (why,) = [line for line in failed.stderr.splitlines() if line.startswith("ci_gate: host (test-host)")]
    assert "no candidate met the constraints" in why and "max_p90_latency_ms" in why and "gguf-q8_0" in why


def test_bad_input_exits_2_naming_the_problem(coordinator, tiny_model_dir, assets, build_yaml, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(tiny_build(tiny_model_dir, assets, objectve="best_quality")))
    cases = {(str(typo),): "unknown key 'objectve'",
             (str(tmp_path / "missing.yaml"),): "cannot read",
             (str(build_yaml), "--device", "pixel-9"): "no target named pixel-9 (the spec has: host, test-host)",
             (str(build_yaml), "--max-p90-ms", "-5"): "--max-p90-ms: must be a positive number, got -5"}
    for args, message in cases.items():
        result = ci_gate(coordinator, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert coordinator.list_builds() == []                                    # nothing was started
