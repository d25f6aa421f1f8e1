"""Test orchestration: one session per package, each in its own virtualenv.

`nox` runs the default sessions: every package's tests (`core`, `sgd`, `adam`, `rmsprop`, `lamb`, `lion`,
`distributed`, `testing`, `cli`), `lint`, then `docs`, the site (its HTML goes to `.nox/docs/tmp/site`).

torch is installed once, not once per session. The session `torch` (every other session
`requires` it, so nox runs it first) makes the virtualenv `.nox/torch`, which holds only torch,
pinned by FUSED_OPTIM_TORCH (default: torch==2.13.0, the CPU build CI uses), and what torch itself
requires (filelock, jinja2, sympy, networkx, fsspec, typing-extensions, setuptools). Each other
session's virtualenv gets a `.pth` file (`_fused_optim_shared_torch.pth`) naming that
virtualenv's site-packages, so its Python finds torch there, after its own site-packages:

* pip sees that torch as installed, so the packages' `torch>=2.4,<3` is satisfied by it, and a
  constraint pins it, so no session can resolve another torch into its own virtualenv. pip never
  writes into `.nox/torch` from a session (it leaves what lies outside the virtualenv alone: a
  package that needs another version of one of torch's requirements gets it in its own
  virtualenv, which comes first on sys.path). `.nox/torch` is shared read-only.
* Everything else a session installs is in its own virtualenv: the package under test, what it
  declares, and the test tools (pytest; numpy, since torch warns "Failed to initialize NumPy"
  without it, where a package does not declare numpy itself). Every package requires torch, so
  torch's own requirements would be there anyway: a package that imports something it does not
  declare still fails in its session.

`.nox/torch` is kept between runs (nox reuses it; pip checks the pin in a few seconds and replaces
torch if FUSED_OPTIM_TORCH changes); the other sessions' virtualenvs are made anew every run.
`rm -rf .nox` starts from nothing. The installer is pip (in virtualenvs made by virtualenv), which
reads pip's configuration, such as the index that serves the CPU torch build; nox looks for uv
anyway, and its log line saying that there is none is dropped below.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"  # session `requires`
# virtualenv (a dependency of nox) makes a virtualenv in about a second, seeding pip from its own
# cache, where `python -m venv` runs ensurepip for several.
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = False
# The docs toolchain (mkdocstrings 1.0, mkdocstrings-python 2) needs Python 3.11+: on 3.10 the
# docs are not a default session (CI builds them on 3.11), rather than a skipped one.
nox.options.sessions = ["core", "sgd", "adam", "rmsprop", "lamb", "lion", "distributed", "testing", "cli", "lint"]
nox.options.sessions += ["docs"] if sys.version_info >= (3, 11) else []

TORCH = os.environ.get("FUSED_OPTIM_TORCH", "torch==2.13.0")
CORE, SGD, TESTING = "./packages/fused-core", "./packages/fused-sgd", "./packages/testing-utils"
ADAM = "./packages/fused-adam"
RMSPROP, LAMB, LION = "./packages/fused-rmsprop", "./packages/fused-lamb", "./packages/fused-lion"
PLUGINS = {SGD: "fused_sgd", ADAM: "fused_adam", RMSPROP: "fused_rmsprop", LAMB: "fused_lamb", LION: "fused_lion"}
"""Every optimizer plugin package of the monorepo, and its import name."""
CLI = "./packages/fused-optim"
# Installed with pytest where the tests import torch and no installed package declares numpy:
# torch warns "Failed to initialize NumPy" without it.
NUMPY = "numpy>=1.22"
DOCS_TOOLS = (
    "mkdocs>=1.6,<2",
    "mkdocs-material>=9.6,<10",
    "mkdocstrings[python]>=1.0,<2",
    "mkdocstrings-python>=2,<3",
    "ruff>=0.6",  # formats the signatures on API pages
    # MathJax 3's browser build, which docs/_hooks/mathjax.py puts into the site (no CDN).
    "django-static-mathjax>=3.2.2,<4",
)
SHARED_TORCH = "torch"  # the session, hence its virtualenv: .nox/torch
SHARED_TORCH_PTH = "_fused_optim_shared_torch.pth"
# The sessions that see the shared torch. No setuptools of their own: torch requires setuptools,
# and a session's own (older) copy would shadow the shared torch's and be upgraded in every session.
WITH_SHARED_TORCH = dict(requires=[SHARED_TORCH], venv_params=["--no-setuptools"])


class _NoUvNotice(logging.Filter):
    """nox looks for uv even when it installs with pip, and logs that it has none: not news here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "uv binary not found."


logging.getLogger("nox").addFilter(_NoUvNotice())


@nox.session(name=SHARED_TORCH, reuse_venv=True)
def shared_torch(session: nox.Session) -> None:
    """The shared torch (FUSED_OPTIM_TORCH and what it requires), seen read-only by the others.

    A virtualenv kept between runs; every other session's virtualenv sees its site-packages through
    a .pth file, after its own."""
    session.install(TORCH)


def install(session: nox.Session, *packages: str, torch: str = "shared") -> None:
    """torch (``"shared"``: the session `torch`'s; ``"system"``: the one the virtualenv already sees;
    else a pip requirement installed here), then pytest and ``packages``, with torch pinned."""
    if torch == "shared":
        where = _see_shared_torch(session)
    elif torch == "system":
        where = "the system site packages"
    else:
        session.install(torch)
        where = "this virtualenv"
    pin = _pin_visible_torch(session)
    session.log(f"{pin} from {where}")
    # No wheel cache: the monorepo's packages keep their version while their code changes.
    session.install("--no-cache-dir", "--constraint", _constraints_file(session, pin), "pytest>=7", *packages)


def _python_paths(session: nox.Session, python: str, external: bool = False) -> list[str]:
    """``python``'s version, then its site-packages directories (purelib, platlib)."""
    script = (
        "import sys, sysconfig; paths = sysconfig.get_paths();"
        "print(sys.version_info[:2], *dict.fromkeys([paths['purelib'], paths['platlib']]), sep='\\n')"
    )
    output = session.run(python, "-c", script, silent=True, external=external, log=False)
    return str(output).strip().splitlines()


def _see_shared_torch(session: nox.Session) -> str:
    """Writes the .pth file that puts .nox/torch's site-packages on this virtualenv's sys.path;
    returns a line that says so."""
    base = Path(session.virtualenv.location).parent / SHARED_TORCH
    base_python = base / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if not base_python.exists():
        session.error(f"no shared torch at {base}: run the session `{SHARED_TORCH}` first (`nox -s {SHARED_TORCH}`)")
    theirs = _python_paths(session, str(base_python), external=True)
    ours = _python_paths(session, "python")
    if theirs[0] != ours[0]:
        session.error(f"the shared torch is for Python {theirs[0]}, this session runs {ours[0]}: rm -rf {base}")
    pth = Path(ours[1], SHARED_TORCH_PTH)
    pth.write_text("".join(f"{path}\n" for path in theirs[1:]))
    return f"{os.path.relpath(base)}, read-only (through {pth.name})"


def _pin_visible_torch(session: nox.Session) -> str:
    """``torch==<version>`` of the torch this virtualenv already sees (its own, the shared one, or
    the system site packages')."""
    output = session.run(
        "python",
        "-c",
        "from importlib.metadata import version; print('torch==' + version('torch'))",
        silent=True,
        success_codes=[0, 1],
        log=False,
    )
    pins = [line for line in str(output).splitlines() if line.startswith("torch==")]
    if not pins:
        session.error(f"this virtualenv sees no installed torch:\n{output}")
    return pins[-1]


def _constraints_file(session: nox.Session, *pins: str) -> str:
    """A pip constraints file holding ``pins`` (the visible torch), so that resolving the packages'
    torch requirement can never replace it."""
    constraints = os.path.join(session.create_tmp(), "constraints.txt")
    with open(constraints, "w") as file:
        file.writelines(f"{pin}\n" for pin in pins)
    return constraints


@nox.session(**WITH_SHARED_TORCH)
def core(session: nox.Session) -> None:
    """fused-core's tests (its own plugin-hook tests use a tiny optimizer defined there)."""
    install(session, CORE, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-core/tests", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def sgd(session: nox.Session) -> None:
    """fused-sgd's tests: parity with torch.optim.SGD, low precision, the torch_npu example."""
    install(session, SGD, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-sgd/tests", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def adam(session: nox.Session) -> None:
    """fused-adam's tests: the conformance suite against torch.optim.Adam/AdamW, the C kernel's bits."""
    install(session, ADAM, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-adam/tests", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def rmsprop(session: nox.Session) -> None:
    """fused-rmsprop's tests: RMSprop and Adadelta against torch.optim, RMSpropTF against its float64 reference."""
    install(session, RMSPROP, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-rmsprop/tests", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def lamb(session: nox.Session) -> None:
    """fused-lamb's tests: Lamb and AdamP against their per-tensor and float64 references, Lamb's C kernel."""
    install(session, LAMB, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-lamb/tests", *session.posargs)
    # The composite launchers alone (torch ops: what CUDA and NPU run), without the C kernels.
    composite = {"FUSED_OPTIM_DISABLE_NATIVE": "1"}
    tests = ("packages/fused-lamb/tests/test_conformance.py", "packages/fused-lamb/tests/test_math.py")
    session.run("pytest", "-q", *tests, *session.posargs, env=composite)


@nox.session(**WITH_SHARED_TORCH)
def lion(session: nox.Session) -> None:
    """fused-lion's tests: Lion against its per-tensor and float64 references."""
    install(session, LION, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-lion/tests", *session.posargs)
    # The composite launcher alone (torch ops: what CUDA and NPU run), without the C kernel.
    composite = {"FUSED_OPTIM_DISABLE_NATIVE": "1"}
    session.run("pytest", "-q", "packages/fused-lion/tests/test_conformance.py", *session.posargs, env=composite)


@nox.session(**WITH_SHARED_TORCH)
def distributed(session: nox.Session) -> None:
    """Fused optimizers under torch.distributed with real processes (gloo on the CPU, 2 and 4 ranks, loopback
    only): DDP, ZeroRedundancyOptimizer, fused_core.distributed.all_reduce_grads, torch.distributed.checkpoint,
    and FSDP2 (fully_shard, HSDP, tensor-parallel DTensors) with every element-wise plugin."""
    # numpy: torch's object collectives, hence torch.distributed.checkpoint, need it.
    install(session, SGD, ADAM, RMSPROP, LAMB, LION, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/fused-sgd/tests_distributed", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def testing(session: nox.Session) -> None:
    """testing-utils' own tests: the float64 reference, shape sets, parity harness."""
    install(session, TESTING, NUMPY)
    session.run("pytest", "-q", "packages/testing-utils/tests", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def cli(session: nox.Session) -> None:
    """The fused-optim command line: `train` and `bench` (quick settings)."""
    install(session, f"{CLI}[plot]")  # fused-optim declares numpy itself
    session.run("pytest", "-q", "packages/fused-optim/tests", *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def bench(session: nox.Session) -> None:
    """`fused-optim bench --quick` (resnet50 and 20k-small, 3 rounds); never a default session.
    Its JSON goes to the session's tmp dir (or pass `-- --json PATH` and other bench options)."""
    install(session, f"{CLI}[plot]")
    report = os.path.join(session.create_tmp(), "bench.json")
    session.run("fused-optim", "bench", "--quick", "--json", report, *session.posargs)


@nox.session(**WITH_SHARED_TORCH)
def lint(session: nox.Session) -> None:
    """ruff over the tree, and mypy over fused-core and every plugin package."""
    install(session, *PLUGINS, "ruff>=0.6", "mypy>=1.10")
    session.run("ruff", "check", ".")
    session.run("mypy", "packages/fused-core/src/fused_core", *(f"{path}/src/{name}" for path, name in PLUGINS.items()))


@nox.session(**WITH_SHARED_TORCH)
def docs(session: nox.Session) -> None:
    """The documentation site, built with `mkdocs build --strict` (a broken link, anchor, snippet or
    docstring reference fails) into .nox/docs/tmp/site, then the scripts in docs/examples that its
    pages show. To read it: `python3 -m http.server -d .nox/docs/tmp/site`, http://127.0.0.1:8000/."""
    install(session, *PLUGINS, CLI, *DOCS_TOOLS)
    site = os.path.join(session.create_tmp(), "site")
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})
    session.run("pytest", "-q", "docs/examples")


@nox.session(venv_backend="venv", venv_params=["--system-site-packages"])
def npu(session: nox.Session) -> None:
    """The NPU hardware suite (packages/fused-sgd/tests_npu), for an Ascend machine; never a default session.

    torch_npu and Ascend's CANN come from the machine and are never installed here: the virtualenv
    sees the site packages of the Python that runs nox, and keeps its torch too, since each torch_npu
    release is built for one torch version (FUSED_OPTIM_TORCH=<spec> installs that torch instead).
    Without an NPU the suite fails, it does not skip. See docs/npu.md.
    """
    install(session, SGD, TESTING, torch=os.environ.get("FUSED_OPTIM_TORCH", "system"))
    # python -m: with system site packages, the `pytest` script found first may belong to another Python.
    session.run("python", "-m", "pytest", "-q", "packages/fused-sgd/tests_npu", *session.posargs)
