"""Small helpers shared by command modules: common options. Tables come from
:mod:`sparsemerge.eval.report` (re-exported here for the command modules)."""
from __future__ import annotations

import argparse

from sparsemerge.eval.report import format_table  # noqa: F401


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


class KeepLinesFormatter(argparse.HelpFormatter):
    """Description and epilog texts with line breaks (lists built from a registry) print as
    written; the rest, and every option's help, wrap as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)
