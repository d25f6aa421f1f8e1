"""Test orchestration: one session per package, each in its own virtualenv.

`nox` runs the default sessions (every package's tests, lint, then the docs). torch is
installed first, pinned by FUSED_OPTIM_TORCH (default: torch==2.13.0, the CPU
build CI uses), so no package's torch range can pull a different build.
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
# The docs toolchain (mkdocstrings 1.0, mkdocstrings-python 2) needs Python 3.11+: on 3.10 the
# docs are not a default session (CI builds them on 3.11), rather than a skipped one.
nox.options.sessions = ["core", "sgd", "distributed", "testing", "cli", "lint"]
nox.options.sessions += ["docs"] if sys.version_info >= (3, 11) else []

TORCH = os.environ.get("FUSED_OPTIM_TORCH", "torch==2.13.0")
CORE, SGD, TESTING = "./packages/fused-core", "./packages/fused-sgd", "./packages/testing-utils"
CLI = "./packages/fused-optim"
DOCS_TOOLS = (
    "mkdocs>=1.6,<2",
    "mkdocs-material>=9.6,<10",
    "mkdocstrings[python]>=1.0,<2",
    "mkdocstrings-python>=2,<3",
    "ruff>=0.6",  # formats the signatures on API pages
)


def install(session: nox.Session, *packages: str, torch: str = TORCH) -> None:
    """torch first (``torch="system"``: keep the one the virtualenv sees), then pytest and ``packages``."""
    pins: tuple[str, ...] = ()
    if torch == "system":
        pins = ("--constraint", _pin_visible_torch(session))
    else:
        session.install(torch)
    # No wheel cache: the monorepo's packages keep their version while their code changes.
    session.install("--no-cache-dir", *pins, "pytest>=7", *packages)


def _pin_visible_torch(session: nox.Session) -> str:
    """A pip constraints file holding the torch this virtualenv already sees (from the system site
    packages), so that resolving the packages' torch requirement can never replace it."""
    output = session.run(
        "python", "-c", "import torch; print('torch==' + torch.__version__)", silent=True, success_codes=[0, 1]
    )
    pins = [line for line in str(output).splitlines() if line.startswith("torch==")]
    if not pins:
        session.error(f"FUSED_OPTIM_TORCH=system, but the Python running nox has no importable torch:\n{output}")
    constraints = os.path.join(session.create_tmp(), "torch-constraint.txt")
    with open(constraints, "w") as file:
        file.write(pins[-1] + "\n")
    return constraints


@nox.session
def core(session: nox.Session) -> None:
    """fused-core's tests (its own plugin-hook tests use a tiny optimizer defined there)."""
    install(session, CORE, TESTING)
    session.run("pytest", "-q", "packages/fused-core/tests", *session.posargs)


@nox.session
def sgd(session: nox.Session) -> None:
    """fused-sgd's tests: parity with torch.optim.SGD, low precision, the torch_npu example."""
    install(session, SGD, TESTING)
    session.run("pytest", "-q", "packages/fused-sgd/tests", *session.posargs)


@nox.session
def distributed(session: nox.Session) -> None:
    """FusedSGD under torch.distributed with real processes (gloo on the CPU, 2 and 4 ranks, loopback only):
    DDP, ZeroRedundancyOptimizer, fused_core.distributed.all_reduce_grads, torch.distributed.checkpoint, FSDP2."""
    # numpy: torch's object collectives, hence torch.distributed.checkpoint, need it.
    install(session, SGD, TESTING, "numpy")
    session.run("pytest", "-q", "packages/fused-sgd/tests_distributed", *session.posargs)


@nox.session
def testing(session: nox.Session) -> None:
    """testing-utils' own tests: the float64 reference, shape sets, parity harness."""
    install(session, TESTING)
    session.run("pytest", "-q", "packages/testing-utils/tests", *session.posargs)


@nox.session
def cli(session: nox.Session) -> None:
    """The fused-optim command line: `train` and `bench` (quick settings)."""
    install(session, f"{CLI}[plot]")
    session.run("pytest", "-q", "packages/fused-optim/tests", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """`fused-optim bench --quick` (resnet50 and 20k-small, 3 rounds); never a default session.
    Its JSON goes to the session's tmp dir (or pass `-- --json PATH` and other bench options)."""
    install(session, f"{CLI}[plot]")
    report = os.path.join(session.create_tmp(), "bench.json")
    session.run("fused-optim", "bench", "--quick", "--json", report, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the tree, and mypy over the public API of fused_core and fused_sgd."""
    install(session, SGD, "ruff>=0.6", "mypy>=1.10")
    session.run("ruff", "check", ".")
    session.run("mypy", "packages/fused-core/src/fused_core", "packages/fused-sgd/src/fused_sgd")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, built with `mkdocs build --strict` (a broken link, anchor, snippet or
    docstring reference fails), then the scripts in docs/examples that its pages show."""
    install(session, SGD, CLI, *DOCS_TOOLS)
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
