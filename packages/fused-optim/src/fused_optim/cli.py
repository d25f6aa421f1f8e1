"""``fused-optim``: one console script, one subcommand per job.

``train`` is the main job, ``bench`` times the step, ``info`` reports this machine's set-up
(paste it into a bug report).
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Sequence

from . import bench, info, train

WIDTH = 88
_ROLE = re.compile(r":[\w:.-]+:`([^`]+)`")  # :mod:`fused_core.native`, :func:`~a.b`
_LITERAL = re.compile(r"``([^`]+)``")
_INTERPRETED = re.compile(r"`([^`]+)`")


def _reference(match: re.Match[str]) -> str:
    """A role's target as reST renders it: ``~a.b.c`` -> ``c``, ``title <target>`` -> ``title``."""
    target = re.sub(r"\s*<[^>]*>$", "", match.group(1))
    return target.rsplit(".", 1)[-1].lstrip("~") if target.startswith("~") else target


def plain(text: str) -> str:
    """A docstring's reST as plain terminal text: roles, literals and interpreted text lose their
    markup, ``::`` becomes ``:``, and each paragraph is wrapped to ``WIDTH`` columns; indented
    lines (examples) are kept as they are."""
    text = _INTERPRETED.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(_reference, textwrap.dedent(text).strip())))
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        block = re.sub(r"(\S)::$", r"\1:", block.rstrip()).replace(" ::\n", ":\n")
        lines = block.splitlines()
        if lines and lines[0].startswith((" ", "-", "*")) or len(lines) > 1 and lines[1].startswith(" "):
            paragraphs.append(block)  # an example or a list: as written
        else:
            paragraphs.append(textwrap.fill(" ".join(line.strip() for line in lines), WIDTH))
    return "\n\n".join(paragraphs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-optim", description=plain(__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,info}")
    for module in (train, bench, info):
        command = commands.add_parser(
            module.NAME,
            help=module.HELP,
            description=plain(module.__doc__ or ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
