"""The one ``--device`` syntax of every ``fused-optim`` command: ``cpu``, ``cuda``, ``cuda:N``, ``npu``, ``npu:N``.

torch_npu is imported only for ``npu`` (it registers the device type with torch).
"""

from __future__ import annotations

import platform

import torch

DEVICE_TYPES = ("cpu", "cuda", "npu")
SYNTAX = "cpu, cuda, cuda:N, npu or npu:N"
HELP = f"{SYNTAX} (default: cpu; npu imports torch_npu, only then)"


class DeviceError(ValueError):
    """A device this machine cannot provide, or a name that is none; the message names the option."""


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``name`` as a torch device, or :class:`DeviceError` saying why this machine cannot run on it."""
    device_type, colon, index = name.partition(":")
    if device_type not in DEVICE_TYPES or (colon and not index.isdigit()) or (device_type == "cpu" and colon):
        raise DeviceError(f"{option} {name!r}: expected {SYNTAX}")
    if device_type == "npu":
        _import_torch_npu(option)
    device = torch.device(name)
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type)
    if not module.is_available():
        why = "this torch build has no CUDA" if device.type == "cuda" and torch.version.cuda is None else "none found"
        raise DeviceError(f"{option} {name}: no {device.type.upper()} device is available ({why})")
    count = module.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"{option} {name}: there {'is' if count == 1 else 'are'} only {count} {device.type.upper()}"
            f" device{'' if count == 1 else 's'}"
        )
    return device


def _import_torch_npu(option: str) -> None:
    try:
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "torch_npu":
            raise DeviceError(f"{option} npu: torch_npu could not be imported: {error}") from None
        raise DeviceError(
            f"{option} npu needs torch_npu (Ascend's PyTorch adapter), which is not installed; "
            f"install the torch_npu release that matches torch {torch.__version__}"
        ) from None
    except (ImportError, OSError, RuntimeError) as error:
        raise DeviceError(f"{option} npu: torch_npu could not be imported: {error}") from None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The name of ``device``'s hardware: the GPU's or NPU's, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return str(torch.npu.get_device_name(device))  # type: ignore[attr-defined]
    return cpu_name()
