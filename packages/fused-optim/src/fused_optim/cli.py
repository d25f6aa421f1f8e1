"""``fused-optim``: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import bench, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-optim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, bench):
        command = commands.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
