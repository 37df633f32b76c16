"""Device profiles for the planner: memory a model may use, memory bandwidth and peak compute, and
where each number comes from — measured by the agent, the catalogue below, or assumed.

Catalogue figures are the vendors' published peaks (dense, no sparsity); GPU compute is the fp16
tensor-core rate (what fp16/bf16 and dequantize-then-matmul kernels run at), CPU compute the fp32
SIMD peak. A model may use all of a GPU's memory; on a computer or a board the OS keeps some
(`app_budget`); on a phone the OS stops a foreground app long before RAM runs out.
"""
from __future__ import annotations

import dataclasses

from shared.errors import InvalidArgument
from shared.memory import GIB

MIB = 1 << 20
OS_RESERVE_BYTES = GIB              # assumed: what a desktop/server/board OS and its services keep
PHONE_APP_SHARE = 0.5               # assumed: Android's low-memory killer / iOS's jetsam act well before RAM is full
GPU_OVERHEAD_BYTES = 512 * MIB      # CUDA context, cuBLAS workspace and allocator slack (~300-500 MiB)
CPU_OVERHEAD_BYTES = 128 * MIB      # the runtime's code, tokenizer and allocator slack on a CPU
ASSUMED_BANDWIDTH = 10e9            # bytes/s: a modest CPU's achievable copy bandwidth
ASSUMED_FLOPS = 50e9                # FLOP/s: a few cores of fp32 SIMD


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int                # what a model may use (VRAM; RAM less the OS's share; a phone app's budget)
    bandwidth_bytes_per_s: float
    peak_flops: float                # FLOP/s at the precision its runtime computes in
    basis: str                       # "measured by the agent: …", "catalogue: …", "assumed: …"
    kind: str = "cpu"                # gpu | cpu | soc (unified memory) | phone
    total_memory_bytes: int = 0      # physical memory
    source: str = ""                 # where the figures come from

    @property
    def overhead_bytes(self) -> int:
        return GPU_OVERHEAD_BYTES if self.kind == "gpu" else CPU_OVERHEAD_BYTES

    @property
    def ridge_flops_per_byte(self) -> float:
        """Peak compute / bandwidth: kernels below this intensity are memory-bound (the roofline's ridge)."""
        return self.peak_flops / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "basis": self.basis, "source": self.source,
                "memory_bytes": self.memory_bytes, "total_memory_bytes": self.total_memory_bytes,
                "bandwidth_gbps": round(self.bandwidth_bytes_per_s / 1e9, 2),
                "peak_gflops": round(self.peak_flops / 1e9, 1),
                "ridge_flops_per_byte": round(self.ridge_flops_per_byte, 2),
                "overhead_bytes": self.overhead_bytes}


def app_budget(os_name: str, arch: str, ram: int) -> tuple[int, str]:
    """(bytes a model may use, why) for a device with `ram` bytes of memory."""
    if os_name in ("android", "ios"):
        return int(ram * PHONE_APP_SHARE), f"assumed: a phone app gets about {PHONE_APP_SHARE:.0%} of RAM"
    if os_name == "macos" and arch == "arm64":
        share = 0.75 if ram > 36 * GIB else 2 / 3
        return int(ram * share), f"assumed: Metal's recommended working set, about {share:.0%} of unified memory"
    return max(0, ram - OS_RESERVE_BYTES), "assumed: RAM less 1 GiB for the OS"


def _gpu(name, memory_gib, bandwidth, flops, source):
    memory = memory_gib * GIB
    return DeviceProfile(name, memory, bandwidth, flops, f"catalogue: {name}", "gpu", memory, source)


def _soc(name, memory_gib, bandwidth, flops, source, os_name="macos", kind="soc"):
    budget, why = app_budget(os_name, "arm64", memory_gib * GIB)
    return DeviceProfile(name, budget, bandwidth, flops, f"catalogue: {name}", kind, memory_gib * GIB,
                         f"{source}; {why}")


# id -> profile. Sources: the vendors' datasheets; derived figures show their arithmetic.
CATALOGUE: dict[str, DeviceProfile] = {
    "a100-80gb": _gpu("A100 80GB SXM", 80, 2.039e12, 312e12,
                      "NVIDIA A100 datasheet: 80 GB HBM2e at 2,039 GB/s, FP16 tensor 312 TFLOP/s dense"),
    "h100-sxm-80gb": _gpu("H100 SXM 80GB", 80, 3.35e12, 989.4e12,
                          "NVIDIA H100 datasheet: 80 GB HBM3 at 3.35 TB/s, FP16 tensor 989.4 TFLOP/s dense"),
    "rtx-4090": _gpu("GeForce RTX 4090", 24, 1.008e12, 165.2e12,
                     "NVIDIA Ada whitepaper: 24 GB GDDR6X at 1,008 GB/s, FP16 tensor with FP32 accumulate "
                     "165.2 TFLOP/s dense"),
    "m1-8gb": _soc("MacBook Air M1 8GB", 8, 68.25e9, 2.6e12,
                   "Apple M1: LPDDR4X-4266 on a 128-bit bus = 68.25 GB/s; 8-core GPU 2.6 TFLOP/s fp32"),
    "m1-16gb": _soc("Mac M1 16GB", 16, 68.25e9, 2.6e12,
                    "Apple M1: LPDDR4X-4266 on a 128-bit bus = 68.25 GB/s; 8-core GPU 2.6 TFLOP/s fp32"),
    "m1-max-64gb": _soc("MacBook Pro M1 Max 64GB", 64, 400e9, 10.4e12,
                        "Apple M1 Max: 400 GB/s; 32-core GPU 10.4 TFLOP/s fp32"),
    "m2-pro-32gb": _soc("Mac M2 Pro 32GB", 32, 200e9, 6.8e12,
                        "Apple M2 Pro: LPDDR5-6400 on a 256-bit bus = 200 GB/s (Apple); 19-core GPU ~6.8 TFLOP/s fp32"),
    "m3-max-128gb": _soc("MacBook Pro M3 Max 128GB", 128, 400e9, 16.4e12,
                         "Apple M3 Max (16-core CPU, 40-core GPU): 400 GB/s (Apple); GPU ~16.4 TFLOP/s fp32"),
    "phone-8gb": _soc("phone, 8 GB", 8, 51.2e9, 0.3e12,
                      "a class, not one model: LPDDR5-6400 on a 64-bit bus = 51.2 GB/s; 8 Arm cores of 128-bit NEON "
                      "FMA at ~2.4 GHz ≈ 0.3 TFLOP/s fp32", os_name="android", kind="phone"),
    "phone-12gb": _soc("phone, 12 GB", 12, 68.3e9, 0.4e12,
                       "a class, not one model: LPDDR5X-8533 on a 64-bit bus = 68.3 GB/s; flagship Arm cores ≈ "
                       "0.4 TFLOP/s fp32", os_name="android", kind="phone"),
    "raspberry-pi-5-8gb": DeviceProfile(
        "Raspberry Pi 5 8GB", 8 * GIB - OS_RESERVE_BYTES, 17.1e9, 153.6e9, "catalogue: Raspberry Pi 5 8GB", "cpu",
        8 * GIB, "BCM2712: LPDDR4X-4267 on a 32-bit bus = 17.1 GB/s; 4 Cortex-A76 at 2.4 GHz × 16 fp32 FLOP/cycle "
                 "(2 × 128-bit NEON FMA) = 153.6 GFLOP/s; RAM less 1 GiB for the OS"),
}


def catalogue_entry(name: str) -> DeviceProfile | None:
    """A catalogue profile by id (`rtx-4090`) or display name, case and separators ignored."""
    key = _key(name)
    for entry_id, profile in CATALOGUE.items():
        if key in (_key(entry_id), _key(profile.name)):
            return profile
    return None


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _positive_float(attributes: dict[str, str], key: str) -> float | None:
    try:
        value = float(attributes[key])
    except (KeyError, ValueError):
        return None
    return value if value > 0 else None


def device_profile(attributes: dict[str, str], name: str = "") -> DeviceProfile:
    """A registered device's profile from its attributes. In order: a `catalogue` label naming an entry (the
    user's statement of what runs the model, e.g. a GPU), the agent's measurements (`mem_bandwidth_gbps`,
    `fp32_gflops`), a `device` label naming an entry, else assumed figures. Memory: `ram_bytes` and `app_budget`."""
    name = name or attributes.get("device") or attributes.get("cpu") or "device"
    label = attributes.get("catalogue", "")
    if label:
        entry = catalogue_entry(label)
        if entry is None:
            raise InvalidArgument(f"device {name}: catalogue label {label[:40]!r} names no entry; known: "
                                  f"{', '.join(CATALOGUE)}", field="attributes.catalogue")
        return dataclasses.replace(entry, name=name)
    try:
        ram = int(attributes.get("ram_bytes", "0"))
    except ValueError:
        ram = 0
    os_name, arch = attributes.get("os", ""), attributes.get("arch", "")
    budget, why = app_budget(os_name, arch, ram)
    bandwidth, gflops = _positive_float(attributes, "mem_bandwidth_gbps"), _positive_float(attributes, "fp32_gflops")
    kind = "phone" if os_name in ("android", "ios") else "soc" if os_name == "macos" and arch == "arm64" else "cpu"
    if bandwidth and gflops:
        return DeviceProfile(name, budget, bandwidth * 1e9, gflops * 1e9,
                             f"measured by the agent: {bandwidth:.1f} GB/s, {gflops:.0f} GFLOP/s", kind, ram,
                             f"the agent's buffer copy and sgemm at start-up; {why}")
    entry = catalogue_entry(attributes.get("device", ""))
    if entry is not None:
        return dataclasses.replace(entry, name=name)
    return DeviceProfile(name, budget, ASSUMED_BANDWIDTH, ASSUMED_FLOPS,
                         f"assumed: {ASSUMED_BANDWIDTH / 1e9:.0f} GB/s, {ASSUMED_FLOPS / 1e9:.0f} GFLOP/s "
                         "(the agent reported no measurements)", kind, ram, why)
