"""fused-optim bench (work in progress)."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
