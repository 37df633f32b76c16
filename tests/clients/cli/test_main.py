"""`edgeforge` as a real process against a real coordinator (tests/integration's fixture): every exit code
(0 ok, 1 failed, 2 bad input, 3 no candidate met the constraints, 4 unreachable, 5 cancelled, 130 Ctrl-C
detached), --json output that parses on stdout and one JSON error object on stderr, and suggestions for
mistyped commands, options, choices and spec keys."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
import yaml
from cli_process import json_error, run_cli

from edgeforge.v1 import common_pb2, coordinator_pb2


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_spec(path, model_dir, assets, **overrides):
    """The tiny random-weight llama with one candidate: builds in seconds."""
    raw = {"name": "cli-test", "model": {"path": str(model_dir)},
           "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
           "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
           "targets": [{"selector": {"device": "test-host"}}],
           "candidates": [{"format": "gguf", "quantization": {"type": "q8_0"}}],
           "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2,
                         "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True}}
    raw.update(overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------ exit 2: bad input, with suggestions
@pytest.mark.parametrize("args, message, field", [
    (["biuld"], "unknown command 'biuld' for 'edgeforge' — did you mean 'build'?", "biuld"),
    (["builds", "lsit"], "unknown command 'lsit' for 'edgeforge builds' — did you mean 'list'?", "lsit"),
    (["build", "spec.yaml", "--wiat"], "unknown option '--wiat' for 'edgeforge build' — did you mean '--wait'?",
     "--wiat"),
    (["tokens", "create", "--role", "admn", "--name", "x"], "invalid value 'admn' for --role", "--role"),
])
def test_mistyped_commands_and_options_suggest_the_right_one(args, message, field):
    text = run_cli(*args)
    assert text.returncode == 2 and message in text.stderr and "--help" in text.stderr and text.stdout == ""
    as_json = run_cli(*args, "--json")
    error = json_error(as_json)
    assert error["exit_code"] == 2 and error["error"]["code"] == "INVALID_ARGUMENT"
    assert message in error["error"]["message"] and error["error"]["field"] == field


def test_bad_spec_names_the_field_line_and_fix(tmp_path, assets, tiny_model_dir):
    spec = tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets)
    spec.write_text(spec.read_text().replace("quantization:", "quantisation:"))
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if "quantisation" in text)
    text = run_cli("build", str(spec), "--wait")
    assert text.returncode == 2, text.stderr
    assert f"invalid spec {spec}:{line}: candidates[0].quantisation: unknown key 'quantisation' at candidates[0] " \
           "— did you mean 'quantization'?" in text.stderr
    error = json_error(run_cli("build", str(spec), "--json"))
    assert error["error"]["field"] == "candidates[0].quantisation" and error["error"]["reason"] == "INVALID_SPEC"


def test_missing_spec_file_is_bad_input(tmp_path):
    process = run_cli("build", str(tmp_path / "absent.yaml"))
    assert process.returncode == 2 and "cannot read" in process.stderr


@pytest.mark.parametrize("flags, field", [(["--token-file", "/nonexistent/token"], "--token-file"),
                                           (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca")])
def test_unreadable_credentials_are_bad_input(flags, field):
    process = run_cli(*flags, "builds", "list", "--json")
    error = json_error(process)
    assert process.returncode == 2 and error["error"]["field"] == field and "/nonexistent/" in error["error"]["message"]


# ------------------------------------------------------------------ exit 4: unreachable
def test_unreachable_coordinator_exits_4():
    address = f"127.0.0.1:{closed_port()}"
    text = run_cli("builds", "list", address=address, token="ef_unused")
    assert text.returncode == 4 and "UNAVAILABLE" in text.stderr
    error = json_error(run_cli("devices", "--json", address=address, token="ef_unused"))
    assert error["exit_code"] == 4 and error["error"]["code"] == "UNAVAILABLE"


# ------------------------------------------------------------------ --json on each command; exit 1
def test_json_output_of_listing_commands(cli, coordinator):
    assert json.loads(cli("builds", "list", "--json").stdout) == []
    assert json.loads(cli("devices", "--json").stdout) == []
    created = cli("tokens", "create", "--role", "builder", "--name", "ci", "--json")
    assert created.returncode == 0 and created.stderr == ""
    token = json.loads(created.stdout)
    assert token["role"] == "builder" and token["token"].startswith("ef_")
    listed = json.loads(cli("tokens", "list", "--json").stdout)
    assert {"id": token["id"], "role": "builder", "name": "ci", "revoked": False} in listed
    revoked = cli("tokens", "revoke", token["id"], "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout) == {"id": token["id"], "role": "builder",
                                                                      "name": "ci", "revoked": True}
    refused = run_cli("tokens", "list", "--json", address=coordinator.address, token=token["token"])
    error = json_error(refused)
    assert refused.returncode == 1 and error["error"]["code"] == "UNAUTHENTICATED"


def test_artifacts_get_and_its_failures(cli, coordinator, tmp_path):
    missing = cli("builds", "get", "b-nope", "--json")
    assert missing.returncode == 1 and json_error(missing)["error"]["code"] == "NOT_FOUND"
    fetched = cli("artifacts", "get", "0" * 64, "-o", str(tmp_path / "x.bin"), "--json")
    assert fetched.returncode == 1 and json_error(fetched)["error"]["code"] == "NOT_FOUND"

    (tmp_path / "data.txt").write_bytes(b"calibration text\n" * 1000)
    artifact = coordinator.upload(tmp_path / "data.txt", common_pb2.ARTIFACT_KIND_DATASET)
    text = cli("artifacts", "get", artifact.name, "-o", str(tmp_path / "copy.txt"))
    assert text.returncode == 0 and text.stdout == "" and f"wrote {tmp_path / 'copy.txt'}" in text.stderr
    assert "100.0%" in text.stderr and "KiB/" in text.stderr                          # the download's progress
    assert (tmp_path / "copy.txt").read_bytes() == (tmp_path / "data.txt").read_bytes()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    unwritable = cli("artifacts", "get", artifact.name, "-o", str(blocked / "copy.txt"), "--json")
    error = json_error(unwritable)
    assert unwritable.returncode == 1 and error["error"]["reason"] == "OS_ERROR"


def test_failed_build_exits_1(cli, tmp_path, assets, tiny_model_dir):
    """Evaluation text shorter than one window fails the build (INSUFFICIENT_DATA) in its evaluate stage."""
    (tmp_path / "short.txt").write_text("Far too short to score.\n")
    spec = tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets,
                     evaluation={"text_file": str(tmp_path / "short.txt"), "window_tokens": 64})
    text = cli("build", str(spec), "--wait")
    assert text.returncode == 1 and "failed" in text.stderr and "INSUFFICIENT_DATA" not in text.stdout
    error = json_error(cli("builds", "get", json.loads(cli("builds", "list", "--json").stdout)[0]["build"], "--json"))
    assert error["exit_code"] == 1 and error["error"]["reason"] == "BUILD_FAILED"


# ------------------------------------------------------------------ exit 5: cancelled; Ctrl-C
def test_cancelled_build_exits_5(cli, tmp_path, assets, tiny_model_dir):
    started = cli("build", str(tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets)), "--json")
    assert started.returncode == 0 and started.stderr == ""
    name = json.loads(started.stdout)["build"]
    cancelled = cli("builds", "cancel", name, "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout) == {"build": name, "cancel_requested": True}
    watched = cli("builds", "watch", name)
    assert watched.returncode == 5 and f"{name} was cancelled" in watched.stderr
    error = json_error(cli("builds", "get", name, "--json"))
    assert error["exit_code"] == 5 and error["error"]["code"] == "CANCELLED"


def _interrupt_watch(coordinator, spec, *flags) -> tuple[subprocess.Popen, str, str]:
    """Starts `edgeforge build SPEC --watch FLAGS`, sends SIGINT once the build has started; returns the
    process (ended), its stderr and the build's name."""
    import os
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFORGE_")}
    process = subprocess.Popen([sys.executable, "-m", "clients.cli.main", "--address", coordinator.address, "--token",
                                coordinator.admin_token, "build", str(spec), "--watch", *flags],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**env, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"})
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("started builds/"):
            break
    name = lines[-1].split()[1]
    time.sleep(0.5)                                   # inside the wait loop
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    return process, "".join(lines) + rest, name


def test_ctrl_c_without_a_terminal_detaches_and_says_how_to_reattach(coordinator, tmp_path, assets, tiny_model_dir):
    spec = tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets)
    process, stderr, name = _interrupt_watch(coordinator, spec)
    assert process.returncode == 130, stderr
    assert f"{name} keeps running" in stderr and f"edgeforge builds watch {name}" in stderr
    assert coordinator.get_build(name).state != coordinator_pb2.BUILD_STATE_CANCELLED
    coordinator.cancel("operations/" + name.removeprefix("builds/"))        # not left running past the test


def test_ctrl_c_with_cancel_on_interrupt_cancels(coordinator, tmp_path, assets, tiny_model_dir):
    spec = tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets)
    process, stderr, name = _interrupt_watch(coordinator, spec, "--cancel-on-interrupt")
    assert process.returncode == 5, stderr
    assert f"cancelling {name}" in stderr and coordinator.get_build(name).state == coordinator_pb2.BUILD_STATE_CANCELLED


def test_ctrl_c_on_a_terminal_asks_and_can_cancel(coordinator, tmp_path, assets, tiny_model_dir):
    """stdin and stderr on a pseudo-terminal: Ctrl-C asks; answering c cancels the build (exit 5)."""
    import os
    import pty
    import select
    import sys
    spec = tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets)
    terminal, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFORGE_")}
    process = subprocess.Popen([sys.executable, "-m", "clients.cli.main", "--address", coordinator.address, "--token",
                                coordinator.admin_token, "build", str(spec), "--watch"], stdin=child, stderr=child,
                               stdout=subprocess.PIPE, text=True,
                               env={**env, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"})
    os.close(child)
    seen = ""

    def read_until(text: str) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while text not in seen:
            assert time.monotonic() < deadline, f"no {text!r} in {seen[-2000:]!r}"
            if select.select([terminal], [], [], 1.0)[0]:
                seen += os.read(terminal, 4096).decode(errors="replace")
    try:
        read_until("started builds/")
        name = "builds/" + seen.split("started builds/", 1)[1].split()[0]
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        read_until("leave it running? [Y]es, detach / [c]ancel the build / [n]o, keep watching:")
        os.write(terminal, b"c\n")
        process.wait(timeout=120)
    finally:
        process.kill()
        os.close(terminal)
    assert process.returncode == 5 and coordinator.get_build(name).state == coordinator_pb2.BUILD_STATE_CANCELLED


# ------------------------------------------------------------------ exit 0 and 3: whole builds, live
@pytest.mark.slow                       # two whole builds with benchmarks: 20 s on a quiet 2-core machine
def test_watch_shows_candidates_live_then_the_table_and_exit_codes(cli, agent, tmp_path, assets, tiny_model_dir):
    spec = tiny_spec(tmp_path / "spec.yaml", tiny_model_dir, assets)
    watched = cli("build", str(spec), "--watch", timeout=600)
    assert watched.returncode == 0, watched.stderr[-3000:]
    assert "candidate (as it is made)" in watched.stderr and "gguf-q8_0" in watched.stderr
    assert "100.0% done" in watched.stderr and "chosen: gguf-q8_0" in watched.stdout   # the last stage, the table
    report = json.loads(cli("build", str(spec), "--wait", "--json", timeout=600).stdout)
    (device,) = report["devices"]
    assert device["chosen"] == "gguf-q8_0"
    artifact = device["candidates"][0]["artifact"]
    fetched = cli("artifacts", "get", artifact, "-o", str(tmp_path / "model.gguf"), "--json")
    assert fetched.returncode == 0 and fetched.stderr == "", fetched.stderr
    assert json.loads(fetched.stdout) == {"artifact": f"artifacts/{artifact}", "path": str(tmp_path / "model.gguf"),
                                          "sha256": artifact, "size_bytes": (tmp_path / "model.gguf").stat().st_size}

    unmet = tiny_spec(tmp_path / "unmet.yaml", tiny_model_dir, assets, constraints={"max_size_bytes": 1000})
    text = cli("build", str(unmet), "--wait", timeout=600)
    assert text.returncode == 3 and "no candidate met the constraints on" in text.stderr
    error = json_error(cli("build", str(unmet), "--wait", "--json", timeout=600))
    assert error["error"]["reason"] == "NO_CANDIDATE_MET_CONSTRAINTS"


def test_store_check_without_a_store_is_a_json_error(tmp_path):
    process = run_cli("store", "check", "--data-dir", str(tmp_path / "nothing"), "--json")
    error = json_error(process)
    assert process.returncode == 2 and process.stdout == "" and error["error"]["code"] == "NOT_FOUND"
