"""A Griffe extension that turns the reST markup of our docstrings into Markdown for mkdocstrings.

The code's docstrings are plain text with a little reST: ``:class:`Name``` (and ``:func:``,
``:mod:``, ``:meth:``, ``:attr:``, ``:data:``) roles, ``:math:`...``` and ``.. math::``,
literal blocks introduced by ``::`` and one simple table. Rather than rewrite them, the docs
build converts them as Griffe loads each object:

* a role becomes a cross-reference, ``[`Name`][resolved.path]``, the name resolved in the
  scope of the object that holds the docstring (``~`` shows the last component only), so a
  role naming nothing that the site documents fails ``mkdocs build --strict``;
* ``:math:`x``` becomes ``\\(x\\)`` and ``.. math::`` a ``\\[ ... \\]`` block (pymdownx.arithmatex);
* ``text::`` before an indented block becomes ``text:`` (the block is already Markdown's
  indented code block);
* a reST simple table (``===  ===`` borders) becomes a Markdown table.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

logger = griffe.get_logger("fused_optim_docs")

ROLE = re.compile(r":(class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
MATH_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
TABLE_BORDER = re.compile(r"^=+( +=+)+$")
ABSOLUTE_ROOTS = (
    "fused_core",
    "fused_sgd",
    "fused_adam",
    "fused_rmsprop",
    "fused_lamb",
    "fused_lion",
    "fused_testing",
    "fused_optim",
)


def resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` as named in ``obj``'s docstring, or None.

    A name is looked up as Python would from ``obj`` outwards (its members, its module's
    names and imports); failing that, as the one object of the package (or, if several, of
    ``obj``'s module) whose path ends with ``target`` (``:meth:`adopt``` in a module that
    does not import the class).
    """
    if target.split(".", 1)[0] in ABSOLUTE_ROOTS:
        return target
    first, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            path = scope.resolve(first)
        except griffe.NameResolutionError:
            scope = scope.parent
            continue
        return f"{path}.{rest}" if rest else path
    matches = [path for path in package_paths(obj.package) if path.endswith(f".{target}")]
    if len(matches) > 1:  # prefer the module that holds the docstring
        matches = [path for path in matches if path.startswith(f"{obj.module.path}.")]
    return matches[0] if len(matches) == 1 else None


def package_paths(package: griffe.Module) -> list[str]:
    """The path of every object defined (not imported) in ``package``."""
    paths: list[str] = []
    stack: list[griffe.Object] = [package]
    while stack:
        current = stack.pop()
        paths.append(current.path)
        stack += [member for member in current.members.values() if not member.is_alias]
    return paths


def convert_roles(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        short, target = match.group(2) == "~", match.group(3)
        shown = target.rsplit(".", 1)[-1] if short else target
        path = resolve(obj, target)
        if path is None:
            logger.warning(f"{obj.path}: cannot resolve reference {match.group(0)}")
            return f"`{shown}`"
        return f"[`{shown}`][{path}]"

    return ROLE.sub(link, MATH_ROLE.sub(lambda m: rf"\({m.group(1)}\)", text))


def convert_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        math = MATH_BLOCK.match(line)
        if math:
            indent, body = math.group(1), [math.group(2)] if math.group(2) else []
            i += 1
            while i < len(lines) and lines[i].strip():
                body.append(lines[i].strip())
                i += 1
            out += ["", rf"{indent}\[", *(indent + part for part in body), rf"{indent}\]", ""]
            continue
        if TABLE_BORDER.match(line.strip()):
            consumed, table = simple_table(lines, i)
            if table:
                out += table
                i += consumed
                continue
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            stripped = line.rstrip()[:-2].rstrip()
            line = f"{stripped}:" if stripped else ""
        out.append(line)
        i += 1
    return "\n".join(out)


def simple_table(lines: list[str], start: int) -> tuple[int, list[str]]:
    """A reST simple table (border, header, border, rows, border) from ``lines[start]`` as
    Markdown; returns (lines consumed, Markdown lines), or (0, []) if it is not one."""
    border = lines[start].strip()
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    spans = [match.span() for match in re.finditer(r"=+", border)]
    borders = [i for i in range(start, len(lines)) if lines[i].strip() == border]
    if len(borders) < 3 or borders[1] != start + 2:
        return 0, []
    end = borders[2]

    def cells(row: str) -> list[str]:
        row = row[len(indent) :]
        bounds = [(a, spans[k + 1][0] if k + 1 < len(spans) else len(row)) for k, (a, _) in enumerate(spans)]
        return [row[a:b].strip().replace("|", r"\|") for a, b in bounds]

    header = cells(lines[start + 1])
    table = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(cells(row)) + " |" for row in lines[start + 3 : end] if row.strip()]
    return end - start + 1, [*table, ""]


class RstMarkup(griffe.Extension):
    """Convert every docstring once its object tree is complete (so names resolve)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert_roles(obj, convert_blocks(obj.docstring.value))
