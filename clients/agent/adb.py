"""Android phones through Debian's real `adb` (apt-get install adb): list them, profile them, push an
artifact, run the runtime's own benchmark binary on the phone, and map its output to a Measurement.

    adb = Adb()                                   # the adb on PATH; Adb("/opt/adb", tools_dir=Path("arm64"))
    phones = adb.devices()                        # ready phones; adb.scan().unready says why others are not
    attributes = adb.profile(phones[0].serial)    # os, os_version, arch, cpu, cores, ram_bytes, runtime:<name>
    result = adb.measure(serial, "gguf", path, config)   # keys are Measurement fields (common.proto)

One phone is one device (one slot per serial). The benchmark binaries are the runtimes' own:
`benchmark_model` (LiteRT/TFLite, runtime "litert"), `llama-bench` (runtime "llama.cpp") and
`onnxruntime_perf_test` (runtime "onnxruntime"), looked up in `<remote_root>/bin` on the phone and, if
missing there, pushed once from `tools_dir` on the host (arm64 builds, with any shared libraries they
need beside them; they run with LD_LIBRARY_PATH set to that directory).

No phone was attached where this was written: every command follows the tools' documented flags
(`adb --help`; benchmark_model's flags in tflite/tools/benchmark/benchmark_model.cc; llama-bench's
usage text; onnxruntime_perf_test's usage text). The pure parts (device listing, command lines,
output mapping) are tested against recorded outputs in tests/clients/agent/fixtures/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

from . import parsers, process
from .cache import sha256_file
from .drivers import CAUSAL_LM
from .measure import Config
from .phone_results import litert_measurement, llama_measurement, onnx_measurement, throughput_results

log = logging.getLogger("edgeforge.agent.adb")

DEFAULT_REMOTE_ROOT = "/data/local/tmp/edgeforge"     # shell-writable on every Android, exec allowed
TOOLS = {"litert": "benchmark_model", "llama.cpp": "llama-bench", "onnxruntime": "onnxruntime_perf_test"}
FORMAT_RUNTIME = {"tflite": "litert", "gguf": "llama.cpp", "onnx": "onnxruntime"}
MODEL_SUFFIX = {"tflite": ".tflite", "gguf": ".gguf", "onnx": ".onnx"}
ABI_ARCH = {"arm64-v8a": "arm64", "armeabi-v7a": "arm", "armeabi": "arm", "x86_64": "x86_64", "x86": "x86"}
HINTS = {   # what a person does about each state adb reports (adb's transport.cpp names them)
    "unauthorized": "authorize USB debugging on the phone (accept the 'Allow USB debugging?' prompt)",
    "authorizing": "the phone is still checking this host's key; wait, or accept the prompt on the phone",
    "offline": "the phone does not answer adb: unplug and replug it, or run `adb kill-server`",
    "no permissions": "this user may not open the USB device: install udev rules (Debian: apt-get install "
                      "android-sdk-platform-tools-common), be in the plugdev group, and replug",
    "connecting": "adb is still connecting to the phone; wait a moment",
}
_DETAIL_KEYS = {"usb", "product", "model", "device", "transport_id", "features"}
_TIME_LINE = re.compile(r"^(Real|User|System) time \(s\):|^Max RSS|^(Major|Minor) faults:|^File system (in|out)puts:|"
                        r"^(Voluntary|Involuntary) context switches:")


class AdbError(OSError):
    """adb is missing, failed or timed out, or a command on the phone failed; the message says which."""


@dataclasses.dataclass(frozen=True)
class Phone:
    serial: str
    state: str                                    # "device" (ready), "unauthorized", "offline", "no permissions", ...
    details: dict[str, str] = dataclasses.field(default_factory=dict)  # usb, product, model, device, transport_id
    reason: str = ""                              # not ready: adb's words and what to do about them


@dataclasses.dataclass(frozen=True)
class Scan:
    ready: list[Phone]
    unready: list[Phone]


# ---------------------------------------------------------------------------- pure: listing, profile
def parse_devices(text: str) -> Scan:
    """`adb devices [-l]` → ready phones (state "device") and the others with a reason. adb prints
    "%-22s %s" (serial, state) then " usb:… product:… model:… device:… transport_id:N" with -l; the
    state may hold spaces ("no permissions (…); see [http://…]"), so the key:value details are peeled
    off from the end, as adb's own comment on transport_id advises."""
    ready, unready = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices attached", "* daemon", "adb server", "adb: ")):
            continue
        if line.startswith("(no serial number)"):            # adb's stand-in for an empty serial
            serial, rest = "(no serial number)", line[len("(no serial number)"):]
        else:
            serial, _, rest = line.replace("\t", " ").partition(" ")
        tokens, details = rest.split(), {}
        while tokens and re.fullmatch(r"[a-z_]+:\S*", tokens[-1]) and tokens[-1].split(":")[0] in _DETAIL_KEYS:
            key, _, value = tokens.pop().partition(":")
            details[key] = value
        state = " ".join(tokens) or "unknown"
        if state == "device":
            ready.append(Phone(serial, state, dict(reversed(details.items()))))
            continue
        kind = "no permissions" if state.startswith("no permissions") else state
        hint = HINTS.get(kind, f"the phone is in {state!r} mode, not booted into Android with USB debugging on")
        unready.append(Phone(serial, kind, dict(reversed(details.items())), f"adb says {state!r}: {hint}"))
    return Scan(ready, unready)


def parse_getprop(text: str) -> dict[str, str]:
    """`getprop` with no argument prints "[name]: [value]" lines; values may be empty."""
    return dict(re.findall(r"^\s*\[([^\]]+)\]: \[(.*)\]\s*$", text, re.MULTILINE))


def cpu_count(nproc: str, possible: str) -> int:
    """Cores: toybox `nproc`, else /sys/devices/system/cpu/possible ("0-7" or "0-3,6")."""
    if nproc.strip().isdigit():
        return int(nproc.strip())
    count = 0
    for part in possible.strip().split(","):
        low, _, high = part.partition("-")
        if low.strip().isdigit():
            count += int(high or low) - int(low) + 1
    return count


def mem_total_bytes(meminfo: str) -> int:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    return int(match[1]) * 1024 if match else 0


def profile_attributes(props: dict[str, str], serial: str, cores: int, ram_bytes: int) -> dict[str, str]:
    """The agent's namespaced device attributes from getprop values (empty ones left out)."""
    abi = props.get("ro.product.cpu.abi", "")
    model = props.get("ro.product.model", "")
    attributes = {"os": "android", "os_version": props.get("ro.build.version.release", ""),
                  "sdk": props.get("ro.build.version.sdk", ""), "arch": ABI_ARCH.get(abi, abi),
                  "cpu": next((props[k] for k in ("ro.soc.model", "ro.board.platform", "ro.hardware") if props.get(k)), ""),
                  "soc_manufacturer": props.get("ro.soc.manufacturer", ""),
                  "cores": str(cores) if cores else "", "ram_bytes": str(ram_bytes) if ram_bytes else "",
                  "device": re.sub(r"\s+", "-", model.strip().lower()),
                  "manufacturer": props.get("ro.product.manufacturer", ""), "serial": serial}
    return {key: value for key, value in attributes.items() if value}


# ---------------------------------------------------------------------------- pure: command lines
def remote_command(argv: list[str], library_dir: str, timer: list[str] | None = None) -> str:
    """One line for the phone's shell: libraries from `library_dir`, optionally under `time -v`."""
    return " ".join([f"LD_LIBRARY_PATH={shlex.quote(library_dir)}", *(timer or []), *map(shlex.quote, argv)])


def benchmark_model_args(tool: str, model: str, config: Config, threads: int) -> list[str]:
    """benchmark_model: the first warm-up run is the cold one ("First inference"), then warmup_runs more
    (warmup_min_secs=0 so no more than asked), then the timed runs (num_runs and min_secs, as LoadGen)."""
    return [tool, f"--graph={model}", f"--num_threads={threads}", f"--warmup_runs={1 + config.warmup_runs}",
            "--warmup_min_secs=0", f"--num_runs={config.timed_runs}", f"--min_secs={config.min_duration_ms / 1000:g}",
            "--max_secs=600", "--report_peak_memory_footprint=true"]


def llama_bench_args(tool: str, model: str, config: Config, threads: int) -> tuple[list[str], list[str] | None]:
    """llama-bench, JSON out: (latency run, throughput run or None). The latency run holds ppP, tgG and
    ppP+tgG (one prompt pass then G tokens: the whole run) × timed_runs; the throughput run the
    configured ppN and tgM tests × throughput_runs."""
    prompt, generation = config.prompt_tokens, config.generation_tokens
    latency = [tool, "-m", model, "-t", str(threads), "-o", "json", "-r", str(config.timed_runs),
               "-p", str(prompt), "-n", str(generation), "-pg", f"{prompt},{generation}"]
    if config.skip_throughput:
        return latency, None
    throughput = [tool, "-m", model, "-t", str(threads), "-o", "json", "-r", str(config.throughput_runs),
                  "-p", ",".join(map(str, config.throughput_prompt_tokens)), "-n", str(config.throughput_generation_tokens)]
    return latency, throughput


def perf_test_args(tool: str, model: str, config: Config, threads: int) -> list[list[str]]:
    """onnxruntime_perf_test on generated inputs (-I; zeros), timed_runs runs, CPU provider, statistics
    on (-s). A causal LM (edgeforge's export: input_ids (batch, sequence), past_key_values.* (batch,
    heads, past_sequence, head_dim)) runs twice: a prefill of prompt_tokens and one decode step after
    prompt_tokens. -f rejects 0, so the prefill carries a one-position (zero) past."""
    base = [tool, "-I", "-m", "times", "-r", str(config.timed_runs), "-x", str(threads), "-e", "cpu", "-s"]
    if config.task != CAUSAL_LM:
        return [[*base, model]]
    prompt = config.prompt_tokens
    prefill = ["-f", "batch:1", "-f", f"sequence:{prompt}", "-f", "past_sequence:1"]
    decode = ["-f", "batch:1", "-f", "sequence:1", "-f", f"past_sequence:{prompt}"]
    return [[*base, *prefill, model], [*base, *decode, model]]


# ---------------------------------------------------------------------------- the adb binary
class Adb:
    """The real adb client. Every phone command names its phone (`-s SERIAL`) and has a timeout; a
    failure or timeout raises AdbError. `server_port` picks the adb server's port (-P; default 5037)."""

    def __init__(self, adb: str = "adb", *, tools_dir: Path | None = None, remote_root: str = DEFAULT_REMOTE_ROOT,
                 server_port: int | None = None, timeout_s: float = 60.0):
        path = shutil.which(adb)
        if path is None:
            raise AdbError(f"adb binary {adb!r} not found (not on PATH, or not executable): install Debian's "
                           "adb (apt-get install adb) or pass the binary's path")
        if tools_dir is not None and not tools_dir.is_dir():
            raise AdbError(f"tools_dir {tools_dir} is not a directory of benchmark binaries")
        self.path, self.tools_dir, self.remote_root = path, tools_dir, remote_root.rstrip("/")
        self.server = ["-P", str(server_port)] if server_port else []
        self.timeout_s = timeout_s
        self._tools: dict[str, dict[str, str]] = {}          # serial -> runtime -> remote binary
        self._versions: dict[str, dict[str, str]] = {}       # serial -> runtime -> version
        self._cores: dict[str, int] = {}
        self._timers: dict[str, list[str] | None] = {}       # serial -> the `time -v` prefix, or None
        self._reported: dict[str, str] = {}                  # serial -> the unready state last logged

    @property
    def bin_dir(self) -> str:
        return f"{self.remote_root}/bin"

    def run(self, args: list[str], *, serial: str | None = None, timeout_s: float | None = None,
            check: bool = True, cancelled: threading.Event | None = None) -> subprocess.CompletedProcess:
        """adb [-P port] [-s SERIAL] ARGS; text out. Polls `cancelled` so a cancelled lease stops at once."""
        command = [self.path, *self.server, *(["-s", serial] if serial else []), *args]
        limit = timeout_s or self.timeout_s
        try:
            child = process.run(command, timeout_s=limit, cancelled=cancelled, text=True)
        except process.Interrupted as why:
            raise AdbError(f"`{shlex.join(command[1:])}` {why}") from None
        if check and child.returncode != 0:
            tail = " | ".join((child.stderr.strip() or child.stdout.strip()).splitlines()[-3:])
            raise AdbError(f"`{shlex.join(command[1:])}` failed (exit {child.returncode}): {tail}")
        return child

    def shell(self, serial: str, command: str, **kwargs) -> subprocess.CompletedProcess:
        """One command line on the phone's shell. adb ≥ 1.0.36 with Android ≥ 7 returns its exit status."""
        return self.run(["shell", command], serial=serial, **kwargs)

    # -- phones
    def scan(self) -> Scan:
        """Every phone adb sees (starting the adb server if none runs), ready or not."""
        return parse_devices(self.run(["devices", "-l"], timeout_s=30).stdout)

    def devices(self) -> list[Phone]:
        """Ready phones; a phone that is not ready is logged, once per state, with what to do about it."""
        scan = self.scan()
        for phone in scan.unready:
            if self._reported.get(phone.serial) != phone.state:
                log.warning("phone %s not usable: %s", phone.serial, phone.reason)
        self._reported = {phone.serial: phone.state for phone in scan.unready}
        return scan.ready

    def profile(self, serial: str) -> dict[str, str]:
        props = parse_getprop(self.shell(serial, "getprop", timeout_s=30).stdout)
        sections = self.shell(serial, "nproc 2>/dev/null; echo @@; cat /sys/devices/system/cpu/possible; echo @@; "
                                      "cat /proc/meminfo", timeout_s=30).stdout.split("@@")
        if len(sections) != 3:
            raise AdbError(f"{serial}: unexpected reply to the cores/memory query: {sections!r:.200}")
        self._cores[serial] = cpu_count(sections[0], sections[1])
        attributes = profile_attributes(props, serial, self._cores[serial], mem_total_bytes(sections[2]))
        attributes.update({f"runtime:{name}": version for name, version in self.runtimes(serial).items()})
        return attributes

    # -- tools on the phone
    def _sync_tools(self, serial: str) -> None:
        """Pushes each file of tools_dir that the phone's bin/ lacks (or holds at another size)."""
        listing = self.shell(serial, f"mkdir -p {shlex.quote(self.bin_dir)} && cd {shlex.quote(self.bin_dir)} && "
                                     "for f in *; do [ -f \"$f\" ] && echo \"$(stat -c %s \"$f\") $f\"; done; true",
                             timeout_s=30).stdout
        remote = {name: int(size) for size, _, name in (line.partition(" ") for line in listing.splitlines())
                  if size.isdigit()}
        local = sorted(p for p in self.tools_dir.iterdir() if p.is_file()) if self.tools_dir else []
        for path in local:
            if remote.get(path.name) != path.stat().st_size:
                log.info("%s: pushing %s to %s", serial, path.name, self.bin_dir)
                self.run(["push", str(path), f"{self.bin_dir}/{path.name}"], serial=serial,
                         timeout_s=60 + path.stat().st_size / 2e6)
                self.shell(serial, f"chmod 755 {shlex.quote(f'{self.bin_dir}/{path.name}')}", timeout_s=30)
                remote[path.name] = path.stat().st_size
        self._tools[serial] = {runtime: f"{self.bin_dir}/{tool}" for runtime, tool in TOOLS.items() if tool in remote}

    def runtimes(self, serial: str) -> dict[str, str]:
        """Runtime name -> version of each benchmark binary on the phone (pushed from tools_dir if
        missing). llama-bench says its version; the others do not, so their binary's sha256 stands in."""
        self._sync_tools(serial)
        versions = {}
        for runtime, tool in self._tools[serial].items():
            version = ""
            if runtime == "llama.cpp":
                reply = self.shell(serial, remote_command([tool, "--version"], self.bin_dir), timeout_s=30, check=False)
                match = re.search(r"^version: (.+)$", reply.stdout + reply.stderr, re.MULTILINE)
                version = match[1].strip() if match else ""
            if not version:
                digest = self.shell(serial, f"sha256sum {shlex.quote(tool)}", timeout_s=60).stdout.split()
                version = f"sha256:{digest[0][:12]}" if digest else "unknown"
            versions[runtime] = version
        self._versions[serial] = versions
        return versions

    def _timer(self, serial: str) -> list[str] | None:
        """toybox's `time -v` (Android 10+; /system/bin/time on some builds), if the phone has one."""
        if serial not in self._timers:
            self._timers[serial] = None
            for prefix in (["toybox", "time", "-v"], ["/system/bin/time", "-v"]):
                reply = self.shell(serial, shlex.join([*prefix, "true"]), timeout_s=30, check=False)
                if "Max RSS (KiB):" in reply.stderr or "Maximum resident set size" in reply.stderr:
                    self._timers[serial] = prefix
                    break
        return self._timers[serial]

    # -- artifacts
    def push_artifact(self, serial: str, local: Path, cancelled: threading.Event | None = None) -> tuple[str, bool]:
        """(remote path of `local`, whether it was pushed). Skipped when the phone already holds files of
        the same size and sha256; otherwise the previous artifact is removed first (phones are small)."""
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"{local} holds no files to push")
        names = {p: p.name if p == local else p.relative_to(local).as_posix() for p in files}
        digests = {p: sha256_file(p) for p in files}
        key = digests[local] if local.is_file() else hashlib.sha256(
            "".join(f"{names[p]} {digests[p]}\n" for p in files).encode()).hexdigest()
        remote_dir = f"{self.remote_root}/models/{key[:16]}"
        quoted = " ".join(shlex.quote(names[p]) for p in files)
        reply = self.shell(serial, f"cd {shlex.quote(remote_dir)} 2>/dev/null && stat -c '%s %n' {quoted} && "
                                   f"sha256sum {quoted}", timeout_s=60 + sum(p.stat().st_size for p in files) / 50e6,
                           check=False)
        sizes = {name: size for size, name in re.findall(r"^(\d+) (.+)$", reply.stdout, re.MULTILINE)}
        hashed = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})\s+\*?(.+)$", reply.stdout, re.MULTILINE)}
        remote = f"{remote_dir}/{names[files[0]]}" if local.is_file() else remote_dir
        if all(sizes.get(names[p]) == str(p.stat().st_size) and hashed.get(names[p]) == digests[p] for p in files):
            return remote, False
        self.shell(serial, f"rm -rf {shlex.quote(self.remote_root + '/models')} && mkdir -p {shlex.quote(remote_dir)}",
                   timeout_s=60)
        for path in files:
            self.run(["push", str(path), f"{remote_dir}/{names[path]}"], serial=serial, cancelled=cancelled,
                     timeout_s=60 + path.stat().st_size / 2e6)      # 2 MB/s: a slow USB 2 link
        return remote, True

    # -- measurement
    def _tool_run(self, serial: str, argv: list[str], cancelled: threading.Event | None, timeout_s: float,
                  timed: bool = True) -> tuple[str, int | None]:
        """Runs one benchmark on the phone: (its stdout and stderr, max RSS in bytes from `time -v`)."""
        timer = self._timer(serial) if timed else None
        reply = self.shell(serial, remote_command(argv, self.bin_dir, timer), timeout_s=timeout_s,
                           cancelled=cancelled, check=False)
        if reply.returncode != 0:               # the tool's own last words, not time -v's counters
            words = [line for line in reply.stderr.splitlines() if line.strip() and not _TIME_LINE.match(line)]
            raise AdbError(f"{Path(argv[0]).name} failed on {serial} (exit {reply.returncode}): "
                           f"{' | '.join((words or reply.stdout.splitlines())[-3:])}")
        try:
            rss = parsers.parse_time_verbose(reply.stderr)["max_rss_bytes"] if timer else None
        except ValueError:
            rss = None
        return reply.stdout + "\n" + reply.stderr, rss

    def measure(self, serial: str, export_format: str, local_path: Path, config: dict,
                cancelled: threading.Event | None = None, timeout_s: float = 1800.0) -> dict:
        """Measures `local_path` (a file, or the directory of an unpacked export) on the phone with its
        runtime's benchmark binary; returns Measurement fields (proto names) for json_format.ParseDict."""
        runtime = FORMAT_RUNTIME.get(export_format)
        if runtime is None:
            raise ValueError(f"no benchmark binary for format {export_format!r} on Android; "
                             f"known: {', '.join(FORMAT_RUNTIME)}")
        settings = Config.from_json(config)
        if serial not in self._tools:
            self.runtimes(serial)
        tool = self._tools[serial].get(runtime)
        if tool is None:
            raise AdbError(f"{serial} has no {TOOLS[runtime]} in {self.bin_dir}, and tools_dir "
                           f"({self.tools_dir or 'not set'}) has none to push")
        remote, pushed = self.push_artifact(serial, local_path, cancelled)
        if not local_path.is_file():
            suffix = MODEL_SUFFIX[export_format]
            model_files = sorted(p for p in local_path.rglob(f"*{suffix}") if p.is_file())
            if len(model_files) != 1:
                raise ValueError(f"{local_path} holds {len(model_files)} {suffix} files; expected exactly one")
            remote = f"{remote}/{model_files[0].relative_to(local_path).as_posix()}"
        if serial not in self._cores:
            self.profile(serial)
        threads = settings.threads or self._cores[serial]
        if runtime == "onnxruntime":
            runs = [parsers.parse_perf_test(self._tool_run(serial, argv, cancelled, timeout_s, timed=False)[0])
                    for argv in perf_test_args(tool, remote, settings, threads)]
            result = onnx_measurement(runs, settings, threads)
        else:
            result = self._measure_repeated(serial, runtime, tool, remote, settings, threads, cancelled, timeout_s)
        result["runtime_versions"] = {runtime: self._versions.get(serial, {}).get(runtime, "unknown")}
        result["notes"].append(f"artifact {'pushed to' if pushed else 'already on'} the phone at {remote}")
        return result

    def _measure_repeated(self, serial: str, runtime: str, tool: str, model: str, settings: Config, threads: int,
                          cancelled: threading.Event | None, timeout_s: float) -> dict:
        """benchmark_model or llama-bench; a latency phase noisier than max_cv_pct is run again, up to
        cv_repeats times, and the last one is reported (as the local protocol does)."""
        args = (benchmark_model_args(tool, model, settings, threads) if runtime == "litert"
                else llama_bench_args(tool, model, settings, threads)[0])
        for attempt in range(1, settings.cv_repeats + 2):
            text, rss = self._tool_run(serial, args, cancelled, timeout_s)
            if runtime == "litert":
                result = litert_measurement(parsers.parse_benchmark_model(text), settings, threads, rss)
            else:
                result = llama_measurement(parsers.parse_llama_bench(text), settings, threads, rss)
            result["attempts"] = attempt
            if not result["unstable"]:
                break
        throughput_args = llama_bench_args(tool, model, settings, threads)[1] if runtime == "llama.cpp" else None
        if throughput_args is not None:
            text, _ = self._tool_run(serial, throughput_args, cancelled, timeout_s, timed=False)
            result["throughput"] = throughput_results(parsers.parse_llama_bench(text))
        return result
