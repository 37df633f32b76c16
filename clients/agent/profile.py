"""This device's profile as namespaced attributes (os, os_version, arch, cpu, cores, ram_bytes,
runtime:<name> -> version), plus user labels."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

RUNTIME_PACKAGES = {"llama.cpp": "llama_cpp_python", "onnxruntime": "onnxruntime"}


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
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _arch() -> str:
    machine = platform.machine().lower()
    return {"aarch64": "arm64", "amd64": "x86_64"}.get(machine, machine)


def runtimes() -> dict[str, str]:
    """Installed runtimes this agent can drive, name -> version."""
    found = {}
    for name, package in RUNTIME_PACKAGES.items():
        try:
            found[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def detect(labels: dict[str, str] | None = None) -> dict[str, str]:
    release = _os_release()
    attributes = {
        "os": platform.system().lower(),
        "os_version": release.get("VERSION_ID", platform.release()),
        "os_name": release.get("PRETTY_NAME", platform.platform()),
        "kernel": platform.release(),
        "arch": _arch(),
        "cpu": cpu_model(),
        "cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "ram_bytes": str(_ram_bytes()),
        "python": platform.python_version(),
    }
    attributes.update({f"runtime:{name}": version for name, version in runtimes().items()})
    attributes.update(labels or {})
    return attributes
