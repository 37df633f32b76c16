"""This host's profile as namespaced attributes, plus user labels.

    os, os_version, os_name, kernel, arch, cpu, cores, ram_bytes, python,
    accelerator:<kind> -> what was found (gpu, npu, ane), runtime:<name> -> version,
    mem_bandwidth_gbps, fp32_gflops -> measured once at start (`measure_speed`, well under a second)

`cores` is what this process may use (its CPU affinity: an agent started under `taskset -c 0` is a
one-core device, and its runtimes get one thread). Runtimes are those the drivers can load here
(drivers.runtime_status), optionally narrowed to the ones the agent was told to offer; the others
are reported with the reason, so a build that needs one says why no device can take it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from .drivers import runtime_status

COPY_BYTES = 64 << 20               # larger than the last-level cache of one CPU cluster (or one EPYC CCD)
SGEMM_SIZE = 384                    # 2·384³ = 113 MFLOP: ~1 ms on a desktop, ~50 ms on a small board
SPEED_BUDGET_S = 0.4                # wall time the measurements may take at agent start-up


def _os_release() -> dict[str, str]:
    path = Path("/etc/os-release")
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v.strip().strip('"') for k, v in pairs}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def arch() -> str:
    machine = platform.machine().lower()
    return {"aarch64": "arm64", "amd64": "x86_64", "armv7l": "arm"}.get(machine, machine)


_PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel", "0x13b5": "arm-mali", "0x5143": "qualcomm"}


def accelerators() -> dict[str, str]:
    """accelerator:<kind> -> vendor/model, from what the OS exposes (no vendor SDK needed)."""
    found = {}
    if platform.system() == "Darwin" and arch() == "arm64":
        found["accelerator:gpu"] = "apple"              # every Apple silicon Mac has the GPU and the ANE
        found["accelerator:ane"] = "apple"
    nvidia = Path("/proc/driver/nvidia/gpus")
    if nvidia.is_dir():
        for info in sorted(nvidia.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    found["accelerator:gpu"] = line.split(":", 1)[1].strip()
                    break
    if "accelerator:gpu" not in found:
        for vendor in sorted(Path("/sys/class/drm").glob("renderD*/device/vendor")):
            name = _PCI_VENDORS.get(vendor.read_text().strip())
            if name:
                found["accelerator:gpu"] = name
                break
    accel = Path("/dev/accel")
    if accel.is_dir() and any(accel.iterdir()):           # the Linux accel subsystem: NPUs (Intel, AMD, ...)
        found["accelerator:npu"] = ",".join(sorted(p.name for p in accel.iterdir()))
    return found


def _best_seconds(run, budget_s: float, repeats: int) -> float:
    """The fastest of up to `repeats` timed calls of `run`, stopping once `budget_s` has passed."""
    best, start = float("inf"), time.perf_counter()
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
        if time.perf_counter() - start > budget_s:
            break
    return best


def _copy_seconds(np, budget_s: float) -> float:
    """Best time to copy COPY_BYTES between two buffers (freed on return, before the sgemm)."""
    source = np.ones(COPY_BYTES // 4, dtype=np.float32)       # written once, so its pages exist before timing
    target = np.empty_like(source)
    np.copyto(target, source)
    return _best_seconds(lambda: np.copyto(target, source), budget_s, 8)


def measure_speed(budget_s: float = SPEED_BUDGET_S) -> dict[str, str]:
    """mem_bandwidth_gbps: a COPY_BYTES buffer copied, counted as STREAM's copy counts it (bytes read +
    bytes written, 10⁹ bytes/s); fp32_gflops: a SGEMM_SIZE² float32 matrix product (2n³ FLOPs) with the
    threads numpy's BLAS uses here. Best of a few runs each, within `budget_s`. What the planner's
    roofline uses for this device (shared/planner); {} when numpy is missing."""
    try:
        import numpy as np
    except ImportError:
        return {}
    copy_s = _copy_seconds(np, budget_s / 2)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE), dtype=np.float32) for _ in range(2))
    a @ b                                                     # warms the BLAS thread pool up
    gemm_s = _best_seconds(lambda: a @ b, budget_s / 2, 8)
    return {"mem_bandwidth_gbps": f"{2 * COPY_BYTES / copy_s / 1e9:.1f}",
            "fp32_gflops": f"{2 * SGEMM_SIZE ** 3 / gemm_s / 1e9:.1f}"}


def detect(labels: dict[str, str] | None = None, offer: set[str] | None = None, *, measure: bool = True
           ) -> tuple[dict[str, str], dict[str, str]]:
    """(attributes, unavailable runtimes name -> why). `offer` narrows the runtimes to those named;
    `measure` adds measure_speed()'s attributes."""
    release = _os_release()
    system = platform.system().lower()
    attributes = {
        "os": "macos" if system == "darwin" else system,
        "os_version": platform.mac_ver()[0] if system == "darwin" else release.get("VERSION_ID", platform.release()),
        "os_name": release.get("PRETTY_NAME", platform.platform()),
        "kernel": platform.release(),
        "arch": arch(),
        "cpu": cpu_model(),
        "cores": str(cores()),
        "ram_bytes": str(ram_bytes()),
        "python": platform.python_version(),
    }
    attributes.update(accelerators())
    if measure:
        attributes.update(measure_speed())
    available, unavailable = runtime_status()
    for name, version in available.items():
        if offer is None or name in offer:
            attributes[f"runtime:{name}"] = version
        else:
            unavailable[name] = "installed, but this agent was started without it (--runtimes)"
    attributes.update(labels or {})
    return attributes, unavailable
