"""matplotlib for ``--plot`` (the ``plot`` extra): checked before any work, with an install hint that
names the package this command was installed from."""

from __future__ import annotations

import json
import shlex
import sys
from importlib import metadata
from urllib.parse import unquote, urlparse

DISTRIBUTION = "fused-optim"
REPOSITORY_PATH = "./packages/fused-optim"
"""The package's path in the repository, for a hint where the installed one's source is unknown."""


def installed_from() -> str | None:
    """The local directory ``fused-optim`` was installed from (pip's ``direct_url.json``), if any."""
    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    try:
        url = urlparse(json.loads(text or "{}").get("url", ""))
    except (ValueError, AttributeError):
        return None
    return unquote(url.path) if url.scheme == "file" and url.path else None


def install_hint() -> str:
    """The command that adds matplotlib to this environment, through the local package's ``plot`` extra."""
    source = installed_from()
    target = shlex.quote(f"{source or REPOSITORY_PATH}[plot]")
    where = "" if source else " (from the repository's root)"
    return f"{shlex.quote(sys.executable)} -m pip install {target}{where}"


def require_matplotlib(option: str = "--plot") -> None:
    """Raise ``ImportError`` with the fix when matplotlib is missing (checked before training, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"{option} needs matplotlib, which is not installed: {install_hint()}") from None
