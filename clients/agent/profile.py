"""This host's profile as namespaced attributes, plus user labels.

    os, os_version, os_name, kernel, arch, cpu, cores, ram_bytes, python,
    accelerator:<kind> -> what was found (gpu, npu, ane), runtime:<name> -> version

`cores` is what this process may use (its CPU affinity: an agent started under `taskset -c 0` is a
one-core device, and its runtimes get one thread). Runtimes are those the drivers can load here
(drivers.runtime_status), optionally narrowed to the ones the agent was told to offer; the others
are reported with the reason, so a build that needs one says why no device can take it.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .drivers import runtime_status


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


def detect(labels: dict[str, str] | None = None, offer: set[str] | None = None
           ) -> tuple[dict[str, str], dict[str, str]]:
    """(attributes, unavailable runtimes name -> why). `offer` narrows the runtimes to those named."""
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
    available, unavailable = runtime_status()
    for name, version in available.items():
        if offer is None or name in offer:
            attributes[f"runtime:{name}"] = version
        else:
            unavailable[name] = "installed, but this agent was started without it (--runtimes)"
    attributes.update(labels or {})
    return attributes, unavailable
