"""fused-optim train (work in progress)."""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
