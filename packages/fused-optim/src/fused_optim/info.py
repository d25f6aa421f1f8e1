"""Report this machine's fused-optim set-up, to paste into a bug report.

Versions (Python, torch, this project's packages and their dependencies), devices, the C and C++
compilers and the cache of compiled kernels, each native library and why one did not load, every
registered plugin and optimizer, and for each (kernel, device, dtype) the launcher that serves it
here and why each other registered launcher does not. ``--json`` writes the same as JSON.

Examining a kernel runs what the optimizer's first step would run: the C kernels are compiled
(once, then cached) and their self-checks run. torch_npu is never imported: an NPU is reported
as whether torch_npu is installed, and examined only if something imported torch_npu already.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import devices

NAME = "info"
HELP = "report versions, devices, compilers, native kernels, plugins and which launcher serves what (for bug reports)"

PACKAGES = ("fused-core", "fused-sgd", "fused-adam", "fused-testing", "fused-optim")
DEPENDENCIES = ("torch", "pluggy", "pydantic", "tqdm", "matplotlib")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
NATIVE_LIBRARIES = (
    # (what it does, module, accessor, source attribute, flag-set attribute or None for native's default)
    ("gradient reader (every .grad in one call)", "fused_core.gradients", "library", "SOURCE", "FLAG_SETS"),
    ("gradient clipping kernels", "fused_core.grad_norm", "library", "SOURCE", None),
    ("per-parameter reductions (Lamb, AdamP, BertAdam)", "fused_core.reductions", "library", "SOURCE", None),
    ("SGD kernel", "fused_sgd.kernels", "c_library", "C_SOURCE", None),
    ("Adam kernel", "fused_adam.kernels", "c_library", "C_SOURCE", None),
    ("RMSprop, RMSpropTF and Adadelta kernels", "fused_rmsprop.c_launchers", "c_library", "C_SOURCE", None),
    ("Lamb kernel", "fused_lamb.lamb_kernels", "c_library", "C_SOURCE", None),
    ("Lion kernel", "fused_lion.kernels", "c_library", "C_SOURCE", None),
)
ENV_PREFIX = "FUSED_OPTIM_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-': stdout)")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=list(DTYPES),
        default=list(DTYPES),
        help="dtypes to examine (default: all four)",
    )


# ----- gathering ---------------------------------------------------------------------------------


def _distribution(name: str) -> dict[str, Any]:
    """Version and where it was installed from (a local directory, editable or not), or not installed."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return {"version": None}
    entry: dict[str, Any] = {"version": dist.version}
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        direct = None
    if isinstance(direct, dict) and str(direct.get("url", "")).startswith("file://"):
        entry["source"] = direct["url"].removeprefix("file://")
        entry["editable"] = bool(direct.get("dir_info", {}).get("editable", False))
    return entry


def _program(words: list[str]) -> dict[str, Any]:
    """A compiler command: where it is and the first line of ``--version``."""
    path = shutil.which(words[0]) if words else None
    entry: dict[str, Any] = {"command": shlex.join(words), "path": path, "version": None}
    if path is None:
        return entry
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
        entry["version"] = (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout or done.stderr else None
    except (OSError, subprocess.TimeoutExpired) as error:
        entry["version"] = f"--version failed: {error}"
    return entry


def _devices() -> dict[str, Any]:
    cuda: dict[str, Any] = {"built_with": torch.version.cuda, "available": False, "devices": []}
    if torch.version.cuda is None:
        cuda["why_not"] = "this torch build has no CUDA"
    elif not torch.cuda.is_available():
        cuda["why_not"] = "torch.cuda.is_available() is False"
    else:
        cuda["available"] = True
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cuda["devices"].append(
                {
                    "device": f"cuda:{index}",
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    spec = importlib.util.find_spec("torch_npu")  # finds, never imports
    npu: dict[str, Any] = {
        "torch_npu_installed": spec is not None,
        "torch_npu_location": getattr(spec, "origin", None) if spec is not None else None,
        "torch_npu_imported": "torch_npu" in sys.modules,
        "devices": [],
    }
    if npu["torch_npu_imported"]:
        module = getattr(torch, "npu", None)
        if module is not None and module.is_available():
            npu["devices"] = [f"npu:{index}" for index in range(module.device_count())]
    return {
        "cpu": {
            "name": devices.cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "cuda": cuda,
        "npu": npu,
    }


def _native() -> dict[str, Any]:
    from fused_core import native

    cache = native.cache_dir()
    libraries = []
    for what, module_name, accessor, source_attribute, flags_attribute in NATIVE_LIBRARIES:
        entry: dict[str, Any] = {"what": what, "module": module_name}
        try:
            module = importlib.import_module(module_name)
            source = Path(getattr(module, source_attribute))
            entry["source"] = source.name
            library = getattr(module, accessor)()
        except Exception as error:  # a report must not fail on one library
            entry.update(loaded=False, reason=f"{type(error).__name__}: {error}")
            libraries.append(entry)
            continue
        entry["loaded"] = library is not None
        if library is None:
            kwargs = {} if flags_attribute is None else {"flag_sets": getattr(module, flags_attribute)}
            reason = native.unavailable_reason(source, **kwargs)
            entry["reason"] = reason or "not built here (no compiler arguments: e.g. torch ships no C++ headers)"
        else:
            entry["path"] = str(getattr(library, "path", "")) or None
        libraries.append(entry)
    return {
        "c_compiler": _program(shlex.split(os.environ.get("CC") or "cc")),
        "cxx_compiler": _program(shlex.split(os.environ.get("CXX") or "c++")),
        "cache_dir": str(cache),
        "cache_exists": cache.is_dir(),
        "cached_libraries": len(list(cache.glob("*.so"))) if cache.is_dir() else 0,
        "disabled": bool(os.environ.get(native.DISABLE_ENV)),
        "libraries": libraries,
    }


def _examined_devices(devices: dict[str, Any]) -> list[torch.device]:
    """cpu, every CUDA device, and NPUs only where torch_npu was already imported."""
    found = [torch.device("cpu")]
    found += [torch.device(entry["device"]) for entry in devices["cuda"]["devices"]]
    found += [torch.device(name) for name in devices["npu"]["devices"]]
    return found


def _verdicts(kernels: Any, kernel: str, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    return [
        {
            "launcher": verdict.launcher,
            "plugin": verdict.plugin,
            "device_type": verdict.device_type,
            "dtypes": verdict.dtypes,
            "serves": verdict.serves,
            "reason": verdict.reason,
        }
        for verdict in kernels.explain(kernel, device, dtype)
    ]


def _launchers(dtypes: list[str], devices: dict[str, Any]) -> list[dict[str, Any]]:
    """For each optimizer's kernel, examined device and dtype: the step's launcher and every verdict."""
    from fused_core import gradients, registry
    from fused_core.kernels import segments_kernel

    kernels = registry.kernels
    reader = gradients.library()
    rows = []
    kernel_names = sorted({cls.kernel for cls in registry.optimizers().values()})
    for kernel in kernel_names:
        segmented = segments_kernel(kernel)
        for device in _examined_devices(devices):
            for name in dtypes:
                dtype = DTYPES[name]
                flat = _verdicts(kernels, kernel, device, dtype)
                segments = _verdicts(kernels, segmented, device, dtype) if segmented in kernels.kernel_names() else []
                serving_flat = next((v["launcher"] for v in flat if v["serves"]), None)
                serving_segments = next((v["launcher"] for v in segments if v["serves"]), None)
                if serving_segments is not None and reader is not None and device.type == "cpu":
                    step, how = serving_segments, "segment launcher: each gradient read where autograd put it"
                elif serving_flat is not None:
                    step, how = serving_flat, "flat launcher: gradients gathered into the flat buffer first"
                    if serving_segments is not None:
                        how += " (the segment launcher needs the gradient reader, which did not load)"
                else:
                    step, how = None, "no launcher: this (device, dtype) cannot be stepped"
                rows.append(
                    {
                        "kernel": kernel,
                        "device": str(device),
                        "dtype": name,
                        "step_launcher": step,
                        "how": how,
                        "candidates": {kernel: flat, segmented: segments},
                    }
                )
    return rows


def _plugins() -> dict[str, Any]:
    from fused_core import registry

    optimizers = registry.optimizers()  # loads the entry-point plugins
    plugins = []
    for name, plugin in registry.manager.list_name_plugin():
        if plugin is None:
            continue
        dist = next((d for p, d in registry.manager.list_plugin_distinfo() if p is plugin), None)
        plugins.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "distribution": f"{dist.project_name} {dist.version}" if dist is not None else None,
            }
        )
    return {
        "entry_point_group": "fused_optim",
        "autoload_disabled": bool(os.environ.get("FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD")),
        "plugins": plugins,
        "optimizers": [
            {
                "name": name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "kernel": cls.kernel,
                "state": list(cls.state_names),
            }
            for name, cls in sorted(optimizers.items())
        ],
    }


def gather(dtypes: list[str] | None = None) -> dict[str, Any]:
    """Everything the report shows, as a JSON-ready dict."""
    devices = _devices()
    return {
        "schema": 1,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "debug": torch.version.debug,
            "git": torch.version.git_version,
        },
        "packages": {name: _distribution(name) for name in (*PACKAGES, *DEPENDENCIES)},
        "environment": {key: value for key, value in sorted(os.environ.items()) if key.startswith(ENV_PREFIX)},
        "devices": devices,
        "native": _native(),
        **_plugins(),
        "launchers": _launchers(list(dtypes or DTYPES), devices),
    }


# ----- text ----------------------------------------------------------------------------------------


def _package_line(name: str, entry: dict[str, Any]) -> str:
    if entry["version"] is None:
        return f"{name} not installed"
    where = ""
    if "source" in entry:
        where = f" ({'editable, ' if entry.get('editable') else ''}{entry['source']})"
    return f"{name} {entry['version']}{where}"


def _compiler_line(entry: dict[str, Any]) -> str:
    if entry["path"] is None:
        return f"{entry['command']}: not found"
    return f"{entry['path']} ({entry['version'] or 'version unknown'})"


def format_report(report: dict[str, Any]) -> str:
    """The report as text, one fact a line (label, then value)."""
    lines: list[str] = []

    def add(label: str, *values: str) -> None:
        for index, value in enumerate(values):
            lines.append(f"{label if index == 0 else '':<12}{value}")

    torch_info = report["torch"]
    add("python", f"{report['python']['version']} ({report['python']['executable']})")
    add("platform", report["platform"])
    add("torch", f"{torch_info['version']} (CUDA {torch_info['cuda'] or 'none'}, git {torch_info['git'][:10]})")
    packages = report["packages"]
    add("packages", *(_package_line(name, packages[name]) for name in PACKAGES))
    add("uses", ", ".join(_package_line(name, packages[name]) for name in DEPENDENCIES if name != "torch"))
    environment = report["environment"]
    add("environment", *([f"{key}={value}" for key, value in environment.items()] or [f"no {ENV_PREFIX}* variables"]))

    devices = report["devices"]
    cpu, cuda, npu = devices["cpu"], devices["cuda"], devices["npu"]
    device_lines = [f"cpu: {cpu['name']}, {cpu['cores']} cores, torch uses {cpu['torch_threads']} threads"]
    if cuda["available"]:
        device_lines += [
            f"{d['device']}: {d['name']}, compute capability {d['capability']}, {d['memory_gib']} GiB"
            for d in cuda["devices"]
        ]
    else:
        device_lines.append(f"cuda: none ({cuda['why_not']})")
    if not npu["torch_npu_installed"]:
        device_lines.append("npu: torch_npu is not installed (looked up without importing it)")
    elif not npu["torch_npu_imported"]:
        device_lines.append(
            f"npu: torch_npu is installed ({npu['torch_npu_location']}); not imported by `info`, so NPUs are not"
            " examined (fused-optim train --device npu imports it)"
        )
    else:
        device_lines.append(f"npu: torch_npu imported; devices: {', '.join(npu['devices']) or 'none available'}")
    add("devices", *device_lines)

    native = report["native"]
    native_lines = [
        f"C compiler: {_compiler_line(native['c_compiler'])}",
        f"C++ compiler: {_compiler_line(native['cxx_compiler'])}",
        f"cache: {native['cache_dir']} ("
        + (f"{native['cached_libraries']} libraries" if native["cache_exists"] else "not created yet")
        + ")",
    ]
    if native["disabled"]:
        native_lines.append("disabled by FUSED_OPTIM_DISABLE_NATIVE: torch ops serve instead")
    for library in native["libraries"]:
        state = "loaded" if library["loaded"] else f"NOT loaded: {library['reason']}"
        native_lines.append(f"{library['what']} ({library['module']}, {library.get('source', '?')}): {state}")
    add("native", *native_lines)

    add(
        "plugins",
        *(
            [
                f"{p['name']} ({p['module']}{', ' + p['distribution'] if p['distribution'] else ''})"
                for p in report["plugins"]
            ]
            or ["none" + (" (FUSED_OPTIM_DISABLE_PLUGIN_AUTOLOAD is set)" if report["autoload_disabled"] else "")]
        ),
    )
    add(
        "optimizers",
        *(
            [
                f"{o['name']}: {o['class']}, kernel '{o['kernel']}', state {', '.join(o['state']) or 'none'}"
                for o in report["optimizers"]
            ]
            or ["none"]
        ),
    )

    lines += ["", "launchers: for each (kernel, device, dtype), the one that steps it here; then each registered"]
    lines += ["launcher, in resolution order: '+' serves, '-' does not, and why"]
    for row in report["launchers"]:
        lines += ["", f"{row['kernel']} on {row['device']}, {row['dtype']}: {row['step_launcher']}"]
        lines.append(f"  {row['how']}")
        for kernel, verdicts in reversed(row["candidates"].items()):  # the segment kernel is tried first
            if not verdicts:
                continue
            role = "segment launchers" if kernel != row["kernel"] else "flat launchers"
            lines.append(f"  {kernel} ({role}):")
            for verdict in verdicts:
                mark = "+" if verdict["serves"] else "-"
                lines.append(
                    f"    {mark} {verdict['launcher']}  [{verdict['device_type']}; dtypes {verdict['dtypes']};"
                    f" plugin {verdict['plugin']}]"
                )
                lines.append(f"        {verdict['reason']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = gather(args.dtype)
    if args.json == "-":
        print(json.dumps(report, indent=1))
        return 0
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"fused-optim info: wrote {args.json}", file=sys.stderr)
    return 0
