"""MathJax served by the site itself, so that its formulas render offline (no CDN).

An mkdocs hook (``hooks:`` in mkdocs.yml). MathJax 3's browser build comes from the
``django-static-mathjax`` package on PyPI, which vendors MathJax's npm release (its ``es5/``
directory: the combined components, the TeX extensions, the CHTML fonts) and has no
dependencies (it does not need Django). Every file of that ``es5/`` directory the page can load is
added to the build as ``javascripts/mathjax/<its path under es5>``, with MathJax's LICENSE beside
them, so the site serves ``javascripts/mathjax/tex-mml-chtml.js`` (``extra_javascript``) and
MathJax finds what it loads at run time (``[tex]/textmacros``, the woff fonts, the menu's
accessibility components) relative to that script, under the same directory. ``mkdocs serve``
serves them the same way.

Left out: the other combined components (``tex-svg.js`` and the like), the SVG output and the
adaptors (for Node), which tex-mml-chtml never loads.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path, PurePosixPath

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DISTRIBUTION = "django-static-mathjax"
SITE_DIR = "javascripts/mathjax"
ENTRY = "tex-mml-chtml.js"
_LEFT_OUT = ("adaptors/", "output/svg/", "output/svg.js")


def _mathjax_root() -> Path:
    """The installed ``mathjax/static/mathjax`` directory (es5/ and LICENSE)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise PluginError(
            f"the docs serve MathJax themselves: `pip install '{DISTRIBUTION}>=3.2.2,<4'` "
            "(the nox session `docs` installs it)"
        ) from None
    root = Path(str(dist.locate_file("mathjax/static/mathjax")))
    if not (root / "es5" / ENTRY).is_file():
        raise PluginError(f"{DISTRIBUTION} {dist.version} has no es5/{ENTRY} under {root}")
    return root


def _wanted(relative: PurePosixPath) -> bool:
    name = relative.as_posix()
    if len(relative.parts) == 1:  # the combined components: only the one the site loads
        return name == ENTRY
    return not name.startswith(_LEFT_OUT)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = _mathjax_root()
    es5 = root / "es5"
    for path in sorted(es5.rglob("*")):
        relative = PurePosixPath(path.relative_to(es5).as_posix())
        if path.is_file() and _wanted(relative):
            files.append(File.generated(config, f"{SITE_DIR}/{relative}", abs_src_path=str(path)))
    files.append(File.generated(config, f"{SITE_DIR}/LICENSE", abs_src_path=str(root / "LICENSE")))
    return files
