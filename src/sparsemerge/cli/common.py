"""Small helpers shared by command modules: common options. Tables come from
:mod:`sparsemerge.eval.report` (re-exported here for the command modules)."""
from __future__ import annotations

import argparse
from typing import Any, Callable

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


class _Deferred:
    """Mixin of a sub-command parser whose registry-built parts are added on first use."""

    _complete_with: "list[Callable[[argparse.ArgumentParser], None]]"

    def _complete(self) -> None:
        while self._complete_with:
            self._complete_with.pop(0)(self)  # type: ignore[arg-type]

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._complete()
        return super().parse_known_args(*args, **kwargs)  # type: ignore[misc]

    def format_help(self) -> str:
        self._complete()
        return super().format_help()  # type: ignore[misc]

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()  # type: ignore[misc]


def defer(parser: argparse.ArgumentParser, complete: "Callable[[argparse.ArgumentParser], None]") -> None:
    """Call ``complete(parser)`` - which adds the options, choices and texts that come from a
    registry - only when this sub-command is parsed or its help printed: building the registries
    imports torch and every format or method module, which other commands and ``--help`` skip."""
    if not isinstance(parser, _Deferred):
        parser.__class__ = type(f"Deferred{type(parser).__name__}", (_Deferred, type(parser)), {})
        parser._complete_with = []  # type: ignore[attr-defined]
    parser._complete_with.append(complete)  # type: ignore[attr-defined]
