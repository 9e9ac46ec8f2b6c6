"""The ``anact`` command line: one sub-command per job.

Each area of the library adds its own sub-commands through a ``register(subparsers)``
function, so this file only wires them together.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from anact.analysis import cli as analysis_cli
    from anact.experiments import cli as experiments_cli

    parser = argparse.ArgumentParser(
        prog="anact", description="Normalized activation functions: analysis and studies."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    analysis_cli.register(sub)
    experiments_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished epochs are saved and the run resumes where it stopped",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
