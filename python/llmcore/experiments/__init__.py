"""`llmcore experiment ...`: the seed documents' claims about training, run for real.

    scaling     loss against compute over a sweep of model sizes; the fitted power law
    grokking    a + b mod p: generalisation long after memorisation
    positions   learned, sinusoidal, RoPE and ALiBi positions, at and beyond the training length

Each writes a JSON table and, with the plot extra (matplotlib), a PNG.
"""
from __future__ import annotations

import argparse

from . import grokking, positions, scaling


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `experiment` and its subcommands to the `llmcore` command's subparsers."""
    p = subparsers.add_parser("experiment", help="scaling laws, grokking, positional encodings",
                              description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    sub.required = True
    for module in (scaling, grokking, positions):
        module.add_parser(sub)
    return p
