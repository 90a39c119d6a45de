"""Compile targets: the chips this project compiles for ahead of time, and their devices without the hardware.

A target string names a platform, a chip and a slice:

    tpu:v5p:4x4x4        a TPU topology (chips in each dimension)
    tpu:v5p-128          a Cloud TPU name (v4 and v5p count 2 TensorCores per chip: v5p-128 is 64 chips, 4x4x4;
                         v5e (v5litepod) and v6e count chips: v5litepod-256 is 16x16, v6e-16 is 4x4)
    gpu:h100:2x8         NVIDIA GPUs: hosts x GPUs per host

``parse(text)`` -> ``Target`` (chip figures, the number of devices); ``Target.devices()`` -> the target's devices from
``jax.experimental.topologies.get_topology_desc``, on which a mesh is built and programs compiled with the target's
own compiler (libtpu for TPU; the deviceless CUDA back end of jax-cuda12-plugin/-pjrt for GPU). Nothing here needs
an accelerator. Chip figures are the vendors' published ones (per chip, bf16 dense), see ``CHIPS``.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" or "gpu"
    hbm_bytes: float
    peak_flops: float  # bf16 dense FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    topology_name: str = ""  # TPU: the prefix get_topology_desc takes ("v5e"); GPU: unused
    dims: int = 2  # TPU topology dimensions (2: v5e/v6e, 3: v4/v5p)
    cores_per_chip_in_name: int = 1  # Cloud TPU names: v4-8 / v5p-8 count TensorCores (2 per chip)
    cloud_prefix: str = ""  # Cloud TPU name prefix ("v5litepod" for v5e)
    gpu_config: str = ""  # GPU: the stream_executor.GpuTargetConfigProto text (get_topology_desc target_config)
    link_bandwidth: float = 0.0  # bytes/s one way over one chip-to-chip link (ICI / NVLink): a ppermute's hop

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GiB


def _gpu_config(*, name: str, sms: int, fpus: int, smem_core: int, smem_optin: int, bandwidth: float, l2: int,
                clock_ghz: float, memory: int, cc_major: int, cc_minor: int = 0) -> str:
    """A GpuTargetConfigProto in text form from a GPU's published figures (the field names are those of XLA's
    xla/backends/gpu/target_config/specs/*.txtpb; values for our chips are the same as there)."""
    minor = f" minor: {cc_minor}" if cc_minor else ""
    return (
        "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
        f"shared_memory_per_core: {smem_core} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus} "
        "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
        f"memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {clock_ghz} "
        f"device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin} "
        f"cuda_compute_capability {{ major: {cc_major}{minor} }} registers_per_core_limit: 65536 "
        "registers_per_block_limit: 65536 }\n"
        f'platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 1 }} device_description_str: "{name}"\n')


_H100_MEMORY = 84942979072  # bytes the H100 SXM 80 GB reports (79.1 GiB), as in XLA's h100_sxm.txtpb
_A100_MEMORY = 85100068864  # A100 SXM4 80 GB, as in XLA's a100_sxm_80.txtpb
_H200_MEMORY = 143771 * 2**20  # H200 SXM 141 GB: the 143 771 MiB nvidia-smi reports

# Published per-chip figures: HBM, peak bf16 dense FLOP/s, HBM bandwidth.
#   TPU: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (v5e 16 GiB / 197 TF / 819 GB/s; v5p 95 GiB / 459 TF /
#   2765 GB/s; v4 32 GiB / 275 TF / 1200 GB/s; v6e 32 GiB / 918 TF / 1640 GB/s).
#   GPU: NVIDIA's H100 SXM (989 TF dense bf16, 3.35 TB/s), H200 SXM (the H100's GH100 chip and clocks: 989 TF;
#   141 GB HBM3e, 4.8 TB/s) and A100 SXM 80 GB (312 TF, 2.039 TB/s) data sheets.
#   link_bandwidth, one way per link: TPU ICI v5p / v6e 90 GB/s, v5e / v4 45 GB/s ("How to Scale Your Model",
#   jax-ml.github.io/scaling-book, part 2); GPU NVLink one way per GPU: H100 / H200 450 GB/s, A100 300 GB/s.
# A pipeline tick's ppermute also pays a fixed latency; we assume PPERMUTE_LATENCY_S (not measured: an ICI hop is
# about 1 us, the rest is the collective's launch and synchronisation), for the pipeline planner's microbatch count.
PPERMUTE_LATENCY_S = 10e-6
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v5e", "tpu", 16 * GiB, 197e12, 819e9, topology_name="v5e", dims=2, cloud_prefix="v5litepod",
         link_bandwidth=45e9),
    Chip("v5p", "tpu", 95 * GiB, 459e12, 2765e9, topology_name="v5p", dims=3, cores_per_chip_in_name=2,
         cloud_prefix="v5p", link_bandwidth=90e9),
    Chip("v4", "tpu", 32 * GiB, 275e12, 1200e9, topology_name="v4", dims=3, cores_per_chip_in_name=2,
         cloud_prefix="v4", link_bandwidth=45e9),
    Chip("v6e", "tpu", 32 * GiB, 918e12, 1640e9, topology_name="v6e", dims=2, cloud_prefix="v6e",
         link_bandwidth=90e9),
    Chip("h100", "gpu", _H100_MEMORY, 989e12, 3.35e12, link_bandwidth=450e9,
         gpu_config=_gpu_config(name="NVIDIA H100 80GB HBM3", sms=132, fpus=128, smem_core=233472,
                                smem_optin=232448, bandwidth=3.35232e12, l2=52428800, clock_ghz=1.98,
                                memory=_H100_MEMORY, cc_major=9)),
    Chip("h200", "gpu", _H200_MEMORY, 989e12, 4.8e12, link_bandwidth=450e9,
         gpu_config=_gpu_config(name="NVIDIA H200", sms=132, fpus=128, smem_core=233472, smem_optin=232448,
                                bandwidth=4.8e12, l2=52428800, clock_ghz=1.98, memory=_H200_MEMORY, cc_major=9)),
    Chip("a100", "gpu", _A100_MEMORY, 312e12, 2.039e12, link_bandwidth=300e9,
         gpu_config=_gpu_config(name="NVIDIA A100-SXM4-80GB", sms=108, fpus=64, smem_core=167936,
                                smem_optin=166912, bandwidth=2.03904e12, l2=41943040, clock_ghz=1.41,
                                memory=_A100_MEMORY, cc_major=8)),
)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "h100-sxm": "h100", "h200-sxm": "h200", "a100-80gb": "a100"}

EXAMPLES = ("tpu:v5e:2x2", "tpu:v5e:16x16", "tpu:v5p:4x4x4", "tpu:v6e:4x4", "tpu:v4:2x2x1", "tpu:v5p-128",
            "tpu:v5litepod-256", "tpu:v6e-16", "gpu:h100:1x8", "gpu:h100:2x8", "gpu:h200:1x8", "gpu:a100:1x8")


def local_chip() -> Chip | None:
    """The CHIPS entry of the accelerator this process runs on (the kernels' own device-kind match,
    kernels._common.traced_generation), None on a CPU or a chip not in CHIPS."""
    from mllm_jax.kernels._common import traced_generation

    gen = traced_generation()
    return CHIPS.get(gen) if gen else None


def gives_costs(target) -> bool:
    """Whether per-layer costs compile for ``target`` (None or "cpu": the host; a Target): the host's and a TPU's
    compiler report a cost analysis, the deviceless GPU back end does not."""
    return target in (None, "cpu") or target.platform == "tpu"


class UnknownTargetError(ValueError):
    pass


def known_targets() -> str:
    tpus = ", ".join(c.name for c in CHIPS.values() if c.platform == "tpu")
    gpus = ", ".join(c.name for c in CHIPS.values() if c.platform == "gpu")
    return (f"TPU chips {tpus} as tpu:<chip>:<AxB[xC]> or Cloud names tpu:<v4|v5p|v5litepod|v6e>-<N>; GPUs {gpus} as "
            f"gpu:<chip>:<hosts>x<gpus per host>; e.g. {', '.join(EXAMPLES)}")


@dataclasses.dataclass(frozen=True)
class Target:
    text: str  # as given
    chip: Chip
    shape: tuple  # TPU: chips per dimension; GPU: (hosts, gpus per host)

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        """The canonical name: tpu:v5p:4x4x4, gpu:h100:2x8."""
        return f"{self.platform}:{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def attention_impl(self) -> str:
        """The attention implementation ``ModelConfig.attention_impl="auto"`` means on this target."""
        return "pallas_tpu" if self.platform == "tpu" else "pallas_gpu"

    def devices(self) -> list:
        """The target's devices (no hardware needed: libtpu / the CUDA PJRT plugin describe the topology)."""
        import os

        from jax.experimental import topologies

        # Only the compiler is used: let libtpu load beside another process that holds it (its lockfile otherwise
        # refuses a second compile on the same machine).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            if self.platform == "tpu":
                name = f"{self.chip.topology_name}:{'x'.join(map(str, self.shape))}"
                kw = {}
                if self.num_devices < 4:  # below one host's 2x2(x1): say the host is smaller (a single chip)
                    kw["chips_per_host_bounds"] = self.shape + (1,) * (3 - len(self.shape))
                if self.chip.cores_per_chip_in_name == 2:
                    # v4 and v5p: the chip's two TensorCores run as one megacore device, as jax sees them on the
                    # hardware (libtpu's default description of v4 has a device per core: 8 on a 2x2x1 slice).
                    kw["chip_config_name"] = "megacore"
                topo = topologies.get_topology_desc(platform="tpu", topology_name=name, **kw)
            else:
                hosts, per_host = self.shape
                name = f"1x{hosts}x{per_host}"
                topo = topologies.get_topology_desc(platform="cuda", topology_name=name, topology=name,
                                                    target_config=self.chip.gpu_config)
        except Exception as e:  # noqa: BLE001 - a missing plugin or a topology the compiler refuses
            raise RuntimeError(f"target {self.text}: cannot describe its devices ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else e}); {install_hint(self)}"
                               ) from e
        devices = list(topo.devices)
        if len(devices) != self.num_devices:
            raise RuntimeError(f"target {self.text}: the topology has {len(devices)} devices, expected "
                               f"{self.num_devices}")
        return devices


def install_hint(target: Target) -> str:
    if target.platform == "tpu":
        return 'compiling for TPU needs libtpu: pip install "jax[tpu]==<your jax version>"'
    return ('compiling for NVIDIA GPUs needs the CUDA plugin of your jax version: pip install '
            '"jax-cuda12-plugin==<your jax version>" "jax-cuda12-pjrt==<your jax version>"')


def _tpu_shape_for_chips(chip: Chip, chips: int, text: str) -> tuple:
    """Google's standard slice shapes: 2-D (v5e, v6e) near-square AxB with A <= B; 3-D (v4, v5p) 2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (each step doubles the smallest dimension from the end)."""
    if chips < 1 or chips & (chips - 1):
        raise UnknownTargetError(f"target {text!r}: {chips} chips is not a power of two; known: {known_targets()}")
    if chip.dims == 2:
        a = 2 ** (int(math.log2(chips)) // 2)
        return (a, chips // a)
    if chips < 4:
        raise UnknownTargetError(f"target {text!r}: {chip.name} slices have at least 4 chips (2x2x1); got {chips}")
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(range(3), key=lambda j: (-shape[j], j))  # the smallest dimension, the last among equals
        shape[i] *= 2
    return tuple(shape)


def parse(text: str) -> Target:
    """'tpu:v5p:4x4x4', 'tpu:v5p-128', 'tpu:v5litepod-256', 'gpu:h100:2x8' -> Target (UnknownTargetError naming
    the text and listing the known targets otherwise)."""
    raw = (text or "").strip()
    parts = raw.lower().split(":")
    platform = parts[0] if parts else ""
    if platform not in ("tpu", "gpu") or len(parts) not in (2, 3):
        raise UnknownTargetError(f"unknown target {text!r}; known: {known_targets()}")
    if platform == "tpu" and len(parts) == 2:  # a Cloud name: v5p-128, v5litepod-256, v6e-16, v4-8
        m = re.fullmatch(r"([a-z0-9]+)-(\d+)", parts[1])
        if not m:
            raise UnknownTargetError(f"unknown target {text!r}; known: {known_targets()}")
        prefix, count = m.group(1), int(m.group(2))
        chip = next((c for c in CHIPS.values() if c.platform == "tpu" and prefix in (c.cloud_prefix, c.name)), None)
        if chip is None:
            raise UnknownTargetError(f"unknown TPU {prefix!r} in target {text!r}; known: {known_targets()}")
        if count % chip.cores_per_chip_in_name:
            raise UnknownTargetError(f"target {text!r}: {chip.cloud_prefix}-N counts {chip.cores_per_chip_in_name} "
                                     f"TensorCores per chip, so N must be even; got {count}")
        return Target(raw, chip, _tpu_shape_for_chips(chip, count // chip.cores_per_chip_in_name, raw))
    if len(parts) != 3:
        raise UnknownTargetError(f"unknown target {text!r}; known: {known_targets()}")
    name = _ALIASES.get(parts[1], parts[1])
    chip = CHIPS.get(name)
    if chip is None or chip.platform != platform:
        raise UnknownTargetError(f"unknown {platform.upper()} {parts[1]!r} in target {text!r}; known: "
                                 f"{known_targets()}")
    if not re.fullmatch(r"\d+(x\d+)*", parts[2]):
        raise UnknownTargetError(f"target {text!r}: the shape {parts[2]!r} is not like 2x2 / 4x4x4 / 2x8; known: "
                                 f"{known_targets()}")
    shape = tuple(int(s) for s in parts[2].split("x"))
    want = chip.dims if platform == "tpu" else 2
    if len(shape) != want or min(shape) < 1:
        form = {2: "AxB", 3: "AxBxC"}[chip.dims] if platform == "tpu" else "<hosts>x<gpus per host>"
        raise UnknownTargetError(f"target {text!r}: {chip.name} takes a shape {form}; got {parts[2]!r}; known: "
                                 f"{known_targets()}")
    return Target(raw, chip, shape)
