"""clients/agent/adb.py: the real adb binary with no phone attached, recorded `adb devices` listings,
the command lines `measure` runs on a phone, and the mapping of recorded tool outputs to Measurement."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format

from clients.agent import adb, parsers
from clients.agent.measure import Config
from edgeforge.v1 import common_pb2

FIXTURES = Path(__file__).parent / "fixtures"
ADB = shutil.which("adb")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def adb_server_port():
    """A port of our own for the adb server the test starts, so a developer's server on 5037 (and any
    phone on it) is never touched; the server is killed afterwards with `adb -P PORT kill-server`."""
    port = free_port()
    yield port
    subprocess.run([ADB, "-P", str(port), "kill-server"], capture_output=True, timeout=30)


# ---------------------------------------------------------------------------- the real adb
@pytest.mark.skipif(ADB is None, reason="Debian's adb is not installed (apt-get install adb)")
def test_real_adb_with_no_phone_attached_lists_none(adb_server_port):
    client = adb.Adb(server_port=adb_server_port)
    assert client.path == ADB
    assert client.devices() == []
    assert client.scan() == adb.Scan(ready=[], unready=[])


def test_missing_adb_binary_is_a_clear_error(tmp_path):
    with pytest.raises(adb.AdbError, match=r"adb binary '.*nowhere/adb' not found .*\(apt-get install adb\)"):
        adb.Adb(str(tmp_path / "nowhere" / "adb"))
    assert issubclass(adb.AdbError, OSError)          # the agent's job loop reports OSErrors as failed jobs


# ---------------------------------------------------------------------------- recorded listings
def test_recorded_empty_listing():
    assert adb.parse_devices(fixture("adb-devices-l-empty.txt")) == adb.Scan([], [])


def test_recorded_unauthorized_phone_beside_an_emulator():
    scan = adb.parse_devices(fixture("adb-devices-l-unauthorized.txt"))
    assert scan.ready == [adb.Phone("emulator-5554", "device", {"product": "sdk_gphone_x86",
                                    "model": "Android_SDK_built_for_x86", "device": "generic_x86", "transport_id": "1"})]
    [phone] = scan.unready
    assert (phone.serial, phone.state, phone.details) == ("984e71340418728d", "unauthorized", {"transport_id": "2"})
    assert "authorize USB debugging on the phone" in phone.reason


def test_recorded_offline_phone():
    scan = adb.parse_devices(fixture("adb-devices-l-offline.txt"))
    assert [(p.serial, p.details["usb"], p.details["model"]) for p in scan.ready] == [("<IDENTIFIER>", "1-9", "<MODEL>")]
    [phone] = scan.unready
    assert (phone.state, phone.details) == ("offline", {"usb": "1-10", "transport_id": "14911"})
    assert "replug" in phone.reason


def test_recorded_phone_without_usb_permissions():
    [phone] = adb.parse_devices(fixture("adb-devices-no-permissions.txt")).unready
    assert (phone.serial, phone.state, phone.details) == ("eb9f484b", "no permissions", {})
    assert "missing udev rules? user is in the plugdev group" in phone.reason
    assert "android-sdk-platform-tools-common" in phone.reason


def test_recorded_usb_phone_details():
    [phone] = adb.parse_devices(fixture("adb-devices-l-usb-device.txt")).ready
    assert phone == adb.Phone("UYT5T18414003349", "device", {"usb": "1114112X", "product": "ALP-AL00",
                                                             "model": "ALP_AL00", "device": "HWALP", "transport_id": "23"})


# ---------------------------------------------------------------------------- profile
def test_profile_from_recorded_getprop():
    props = adb.parse_getprop(fixture("getprop-emulator-android-p-excerpt.txt"))
    assert len(props) == 37 and props["ro.build.version.base_os"] == ""
    attributes = adb.profile_attributes(props, "emulator-5554", cores=4, ram_bytes=2 << 30)
    assert attributes == {"os": "android", "os_version": "P", "sdk": "27", "cpu": "ranchu", "cores": "4",
                          "ram_bytes": str(2 << 30), "serial": "emulator-5554"}


def test_profile_names_arch_device_and_cpu():
    props = {"ro.product.cpu.abi": "arm64-v8a", "ro.product.model": "Pixel 8 Pro", "ro.soc.model": "",
             "ro.board.platform": "zuma", "ro.hardware": "husky", "ro.product.manufacturer": "Google"}
    attributes = adb.profile_attributes(props, "S1", cores=9, ram_bytes=0)
    assert (attributes["arch"], attributes["device"], attributes["cpu"]) == ("arm64", "pixel-8-pro", "zuma")
    assert adb.profile_attributes({"ro.product.cpu.abi": "armeabi-v7a"}, "S", 0, 0)["arch"] == "arm"
    assert adb.profile_attributes({"ro.product.cpu.abi": "x86_64"}, "S", 0, 0)["arch"] == "x86_64"


def test_cores_and_memory_from_this_machines_real_files():
    possible = Path("/sys/devices/system/cpu/possible").read_text()        # e.g. "0-1\n"
    assert adb.cpu_count("", possible) >= len(os.sched_getaffinity(0))
    assert adb.cpu_count("8\n", "0-3") == 8 and adb.cpu_count("", "0-3,6") == 5
    assert adb.mem_total_bytes(Path("/proc/meminfo").read_text()) == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------- command lines
CONFIG = Config.from_json({"prompt_tokens": 128, "generation_tokens": 32, "warmup_runs": 2, "timed_runs": 5,
                           "min_duration_ms": 1500, "throughput_prompt_tokens": [128, 512],
                           "throughput_generation_tokens": 64, "throughput_runs": 3, "task": "causal_lm"})
BIN = "/data/local/tmp/edgeforge/bin"


def test_benchmark_model_command():
    assert adb.benchmark_model_args(f"{BIN}/benchmark_model", "/m/lm.tflite", CONFIG, 4) == [
        f"{BIN}/benchmark_model", "--graph=/m/lm.tflite", "--num_threads=4", "--warmup_runs=3", "--warmup_min_secs=0",
        "--num_runs=5", "--min_secs=1.5", "--max_secs=600", "--report_peak_memory_footprint=true"]


def test_llama_bench_commands():
    latency, throughput = adb.llama_bench_args(f"{BIN}/llama-bench", "/m/q4.gguf", CONFIG, 8)
    assert latency == [f"{BIN}/llama-bench", "-m", "/m/q4.gguf", "-t", "8", "-o", "json", "-r", "5",
                       "-p", "128", "-n", "32", "-pg", "128,32"]
    assert throughput == [f"{BIN}/llama-bench", "-m", "/m/q4.gguf", "-t", "8", "-o", "json", "-r", "3",
                          "-p", "128,512", "-n", "64"]
    skip = Config.from_json({"skip_throughput": True})
    assert adb.llama_bench_args("lb", "m.gguf", skip, 2) == (
        ["lb", "-m", "m.gguf", "-t", "2", "-o", "json", "-r", "5", "-p", "128", "-n", "32", "-pg", "128,32"], None)


def test_perf_test_commands():
    prefill, decode = adb.perf_test_args(f"{BIN}/onnxruntime_perf_test", "/m/model.onnx", CONFIG, 4)
    base = [f"{BIN}/onnxruntime_perf_test", "-I", "-m", "times", "-r", "5", "-x", "4", "-e", "cpu", "-s"]
    assert prefill == [*base, "-f", "batch:1", "-f", "sequence:128", "-f", "past_sequence:1", "/m/model.onnx"]
    assert decode == [*base, "-f", "batch:1", "-f", "sequence:1", "-f", "past_sequence:128", "/m/model.onnx"]
    single = adb.perf_test_args("p", "m.onnx", Config.from_json({"task": "image_classification"}), 1)
    assert single == [["p", "-I", "-m", "times", "-r", "5", "-x", "1", "-e", "cpu", "-s", "m.onnx"]]


def test_remote_command_quotes_every_argument():
    line = adb.remote_command([f"{BIN}/llama-bench", "-m", "/m/a b.gguf"], BIN, ["toybox", "time", "-v"])
    assert line == f"LD_LIBRARY_PATH={BIN} toybox time -v {BIN}/llama-bench -m '/m/a b.gguf'"


# ---------------------------------------------------------------------------- recorded outputs → Measurement
def as_measurement(result: dict) -> common_pb2.Measurement:
    """What the agent does with measure()'s dict: unknown keys or wrong types fail here."""
    return json_format.ParseDict(result, common_pb2.Measurement(), ignore_unknown_fields=False)


def test_litert_measurement_from_recorded_android_run():
    parsed = parsers.parse_benchmark_model(fixture("benchmark_model-android-tf42507.txt"))
    result = adb.litert_measurement(parsed, CONFIG, 4, rss_bytes=None)
    measurement = as_measurement(result)
    assert measurement.driver == "adb" and measurement.runtime == "litert" and measurement.threads == 4
    assert measurement.latency.mean_ms == pytest.approx(33.2094) and measurement.latency.stddev_ms == pytest.approx(0.45)
    assert measurement.latency.p50_ms == 0 and not measurement.latency.samples_ms       # not reported by this build
    assert measurement.load_ms == pytest.approx(0.855) and measurement.first_run_ms == pytest.approx(49.06)
    assert measurement.warmup_runs == 14 and measurement.duration_ms == pytest.approx(50 * 33.2094)
    assert measurement.cv_pct == pytest.approx(100 * 450 / 33209.4) and not measurement.unstable
    assert measurement.peak_rss_bytes == 0
    assert any("peak_rss_bytes not measured" in note for note in measurement.notes)
    with_time = adb.litert_measurement(parsed, CONFIG, 4, rss_bytes=parsers.parse_time_verbose(
        fixture("toybox-time-v.txt"))["max_rss_bytes"])
    assert as_measurement(with_time).peak_rss_bytes == 2280 * 1024


def test_onnx_measurement_from_recorded_runs():
    acl = parsers.parse_perf_test(fixture("perf_test-acl-armv8-ort1.3.1.txt"))
    single = as_measurement(adb.onnx_measurement([acl], Config.from_json({"task": "causal_lm"}), 4))
    assert single.latency.mean_ms == pytest.approx(144.871) and single.load_ms == pytest.approx(127.918)
    assert single.peak_rss_bytes == 158171136 and single.runtime == "onnxruntime"
    # The derivation for a causal LM (prefill + G decode steps); one recorded run stands in for both here.
    stats = parsers.parse_perf_test(fixture("perf_test-readme-sample-statistics.txt"))
    derived = as_measurement(adb.onnx_measurement([stats, stats], CONFIG, 4))
    assert derived.latency.mean_ms == pytest.approx(58.8053 * 33)
    assert derived.latency.p50_ms == pytest.approx(58.7108 * 33)
    assert derived.prompt_tokens_per_s == pytest.approx(128 / 0.0587108)
    assert derived.generation_tokens_per_s == pytest.approx(1 / 0.0587108)
    assert any(note.startswith("derived: latency = prefill of 128 tokens + 32 × one decode step") for note in derived.notes)


def test_llama_measurement_needs_json_samples():
    markdown = parsers.parse_llama_bench(fixture("llama-bench-md-radxa-dragon-q8b.txt"))
    config = Config.from_json({"prompt_tokens": 4096, "generation_tokens": 128})
    with pytest.raises(ValueError, match=r"no pp4096\+tg128 test with samples \(run with -o json\)"):
        adb.llama_measurement(markdown, config, 8)
    results = adb.throughput_results(markdown)
    assert results[0] == {"test": "pp512", "tokens": 512, "tokens_per_s": 194.49, "stddev_tokens_per_s": 0.74,
                          "samples_ms": []}
    assert results[3]["tokens"] == 4096 + 128


# ---------------------------------------------------------------------------- measure() end to end
FAKE_ADB = '''#!/bin/sh
# A stand-in for adb: "the phone" is the directory $FAKE_PHONE, whose shell is this host's sh.
exec {python} - "$@" <<'PY'
import os, shutil, subprocess, sys
args, phone = sys.argv[1:], os.environ["FAKE_PHONE"]
while args and args[0] in ("-P", "-s"):
    args = args[2:]
remote = lambda text: text.replace("/data/local/tmp/edgeforge", phone + "/data/local/tmp/edgeforge")
if args[:2] == ["devices", "-l"]:
    print("List of devices attached\\nFAKE01                 device usb:1-1 product:fake model:Fake_Phone "
          "device:fake transport_id:1")
elif args[0] == "push":
    os.makedirs(os.path.dirname(remote(args[2])), exist_ok=True)
    shutil.copyfile(args[1], remote(args[2]))
elif args[0] == "shell":
    env = dict(os.environ, PATH=os.environ["FAKE_PHONE_BIN"] + ":" + os.environ["PATH"])
    sys.exit(subprocess.run(["sh", "-c", remote(args[1])], env=env).returncode)
PY
'''


@pytest.fixture
def fake_phone(tmp_path, monkeypatch):
    """adb.Adb over a stand-in adb whose phone is a directory and whose `getprop` prints a recorded
    getprop excerpt; the benchmark binaries are stand-ins that print recorded outputs."""
    import sys
    fake_bin, phone = tmp_path / "fake-bin", tmp_path / "phone"
    fake_bin.mkdir()
    phone.mkdir()
    (fake_bin / "adb").write_text(FAKE_ADB.format(python=sys.executable))
    (fake_bin / "getprop").write_text(f"#!/bin/sh\ncat {FIXTURES / 'getprop-emulator-android-p-excerpt.txt'}\n")
    for script in fake_bin.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("FAKE_PHONE", str(phone))
    monkeypatch.setenv("FAKE_PHONE_BIN", str(fake_bin))
    return fake_bin, phone


def test_llama_measurement_from_recorded_json():
    latency_run = parsers.parse_llama_bench(fixture("llama-bench-json-latency.txt"))
    result = adb.llama_measurement(latency_run, CONFIG, 2, rss_bytes=None)
    measurement = as_measurement(result)
    whole = [21406.801397, 20856.875914, 15026.754616, 16865.160287, 12126.880096]
    assert list(measurement.latency.samples_ms) == pytest.approx(whole)
    assert measurement.latency.p50_ms == pytest.approx(16865.160287)
    assert measurement.latency.mean_ms == pytest.approx(sum(whole) / 5)
    assert measurement.duration_ms == pytest.approx(sum(whole))
    assert measurement.prompt_tokens_per_s == pytest.approx(19.1085)       # median of pp128's samples_ts
    assert measurement.generation_tokens_per_s == pytest.approx(1.81571)   # median of tg32's samples_ts
    assert list(measurement.prompt_samples_ms)[0] == pytest.approx(12473.183087)
    assert measurement.cv_pct > CONFIG.max_cv_pct and measurement.unstable      # a noisy, shared 2-core host
    assert measurement.runtime == "llama.cpp" and measurement.warmup_runs == 1 and measurement.load_ms == 0
    assert any(note.startswith("latency: llama-bench's pp128+tg32 test, 5 runs") for note in measurement.notes)


def stand_in(path: Path, body: str) -> None:
    """A benchmark binary that logs its arguments on the phone and prints recorded output."""
    path.write_text(f'#!/bin/sh\necho "{path.name} $*" >> "$FAKE_PHONE/calls.log"\n{body}\n')
    path.chmod(0o755)


def test_measure_end_to_end_on_a_stand_in_phone(fake_phone, tmp_path):
    fake_bin, phone = fake_phone
    tools = tmp_path / "arm64-tools"
    tools.mkdir()
    stand_in(tools / "llama-bench", f'case " $* " in *" --version "*) cat {FIXTURES / "llama-bench-version.txt"} >&2;; '
                                    f'*" -pg "*) cat {FIXTURES / "llama-bench-json-latency.txt"};; '
                                    f'*) cat {FIXTURES / "llama-bench-json-throughput.txt"};; esac')
    stand_in(tools / "benchmark_model", f"cat {FIXTURES / 'benchmark_model-android-tf42507.txt'} >&2")
    stand_in(tools / "onnxruntime_perf_test", f"cat {FIXTURES / 'perf_test-acl-armv8-ort1.3.1.txt'}")
    (tools / "libonnxruntime.so").write_bytes(b"\x7fELF stand-in library")
    client = adb.Adb(str(fake_bin / "adb"), tools_dir=tools)

    [phone_entry] = client.devices()
    attributes = client.profile(phone_entry.serial)
    assert attributes["runtime:llama.cpp"] == "0.5.0-dev (build 1, commit 0c1e570)"
    assert attributes["runtime:litert"].startswith("sha256:") and attributes["runtime:onnxruntime"].startswith("sha256:")
    assert (attributes["os"], attributes["os_version"], attributes["sdk"], attributes["serial"]) == \
        ("android", "P", "27", "FAKE01")
    remote_bin = phone / "data/local/tmp/edgeforge/bin"
    assert sorted(p.name for p in remote_bin.iterdir()) == ["benchmark_model", "libonnxruntime.so", "llama-bench",
                                                            "onnxruntime_perf_test"]

    model = tmp_path / "q4.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    config = {"prompt_tokens": 128, "generation_tokens": 32, "task": "causal_lm", "cooldown_ms": 1000}
    measurement = as_measurement(client.measure("FAKE01", "gguf", model, config))
    assert measurement.attempts == 3 and measurement.unstable       # the recorded runs are noisy: 2 repeats
    assert list(measurement.latency.samples_ms)[0] == pytest.approx(21406.801397)
    assert [t.test for t in measurement.throughput] == ["pp128", "pp512", "tg128"]
    assert measurement.runtime_versions == {"llama.cpp": "0.5.0-dev (build 1, commit 0c1e570)"}
    assert (measurement.peak_rss_bytes > 0) == (shutil.which("toybox") is not None)
    remote_model = f"/data/local/tmp/edgeforge/models/{adb.sha256_file(model)[:16]}/q4.gguf"
    assert measurement.notes[-1] == f"artifact pushed to the phone at {remote_model}"
    calls = (phone / "calls.log").read_text().replace(str(phone), "").splitlines()   # the phone's own paths
    latency_call = f"llama-bench -m {remote_model} -t {attributes['cores']} -o json -r 5 -p 128 -n 32 -pg 128,32"
    assert calls.count(latency_call) == 3
    assert calls[-1].startswith("llama-bench -m") and calls[-1].endswith("-r 3 -p 128,512 -n 128")

    again = as_measurement(client.measure("FAKE01", "gguf", model, {**config, "cv_repeats": 0}))
    assert again.notes[-1] == f"artifact already on the phone at {remote_model}" and again.attempts == 1

    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"TFL3 stand-in")
    litert = as_measurement(client.measure("FAKE01", "tflite", tflite, {"threads": 4, "task": "causal_lm"}))
    assert litert.latency.mean_ms == pytest.approx(33.2094) and litert.threads == 4
    assert not (phone / "data/local/tmp/edgeforge/models" / adb.sha256_file(model)[:16]).exists()   # one at a time
    assert f"benchmark_model --graph=/data/local/tmp/edgeforge/models/{adb.sha256_file(tflite)[:16]}/m.tflite " \
           "--num_threads=4 --warmup_runs=2" in (phone / "calls.log").read_text().replace(str(phone), "")

    export = tmp_path / "onnx-export"
    (export / "data").mkdir(parents=True)
    (export / "model.onnx").write_bytes(b"onnx stand-in")
    (export / "data" / "weights.bin").write_bytes(b"external data stand-in")
    onnx = as_measurement(client.measure("FAKE01", "onnx", export, {"threads": 2}))
    assert onnx.peak_rss_bytes == 158171136 and onnx.latency.mean_ms == pytest.approx(144.871 * 33)
    assert onnx.notes[-1].endswith("/model.onnx")
    assert sorted(p.name for p in (phone / "data/local/tmp/edgeforge/models").rglob("*") if p.is_file()) == \
        ["model.onnx", "weights.bin"]


def test_measure_reports_a_missing_binary(fake_phone, tmp_path):
    fake_bin, _ = fake_phone
    client = adb.Adb(str(fake_bin / "adb"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(adb.AdbError, match=r"FAKE01 has no llama-bench in /data/local/tmp/edgeforge/bin, "
                                           r"and tools_dir \(not set\) has none to push"):
        client.measure("FAKE01", "gguf", model, {})
    with pytest.raises(ValueError, match=r"no benchmark binary for format 'coreml' on Android"):
        client.measure("FAKE01", "coreml", model, {})
