"""Command lines generated from dataclasses: every p4bg command is parsed the same way.

A command's options are a dataclass whose fields carry their help (:func:`option`); the parser
is made from it (:func:`build_parser`) and parsing returns an instance (:func:`parse`), typed
and with its defaults, so that calling a command from Python and from the shell take the same
object. Conventions, for every command:

* ``--some-option VALUE`` or ``--some-option=VALUE`` for field ``some_option``; a ``bool``
  field is a switch (``--no-progress``); ``X | None`` takes an X, None when absent;
  ``tuple[float, float, float]`` takes three numbers; ``list[Path]`` is positional, any number.
* no abbreviations: ``--n`` is never ``--n-workers`` (torchrun's parser does abbreviate, and
  takes ``--n`` for its own options: p4bg.sample names its count ``--n-samples``).
* a wrong or missing value raises :class:`p4bg.config.ConfigError` naming the option; the
  commands print it as ``p4bg.X: error: ...`` and exit with status 2, as argparse would.

argparse does the parsing (help, types, choices); this module only writes its calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from p4bg.config import ConfigError

__all__ = ["Parser", "build_parser", "option", "parse"]

T = TypeVar("T")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    aliases: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    positional: bool = False,
    hidden: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option (no ``default``: required)."""
    metadata = {"help": help, "aliases": tuple(aliases), "choices": choices,
                "metavar": metavar, "positional": positional, "hidden": hidden}  # fmt: skip
    if isinstance(default, list | tuple) and not isinstance(default, str):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as :class:`ConfigError` (the commands print and exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def print_help(self, file: typing.IO[str] | None = None) -> None:
        try:
            super().print_help(file)
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`: the reader left; no traceback at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _kind(hint: Any) -> Any:
    """The value type of a field's annotation (X of ``X | None``: None is the default)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """Add one argument per field of the dataclass ``options`` to ``parser``."""
    hints = typing.get_type_hints(options)
    for f in fields(options):
        meta = f.metadata
        kind = _kind(hints[f.name])
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)  # fmt: skip
        required = f.default is MISSING and f.default_factory is MISSING
        text = meta.get("help", "")
        if not (default is None or default is False or default == []) and not required:
            text = f"{text} (default: {default})" if text else f"default: {default}"
        kwargs: dict[str, Any] = {"help": argparse.SUPPRESS if meta.get("hidden") else text}
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar") is not None:
            kwargs["metavar"] = meta["metavar"]
        origin = typing.get_origin(kind)
        if kind is bool:
            if default is not False:
                raise TypeError(f"{options.__name__}.{f.name}: a switch must default to False")
            kwargs["action"] = "store_true"
        elif origin is list:
            kwargs.update(nargs="*", type=typing.get_args(kind)[0])
        elif origin is tuple:
            inner = typing.get_args(kind)
            kwargs.update(nargs=len(inner), type=inner[0])
        else:
            kwargs["type"] = kind
        if meta.get("positional"):
            if origin is not list and not required:
                kwargs["nargs"] = "?"
            if origin is list or not required:
                kwargs["default"] = default
            parser.add_argument(f.name, **kwargs)
            continue
        names = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", ())]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(*names, dest=f.name, **kwargs)


def build_parser(options: type, prog: str, description: str = "") -> Parser:
    """The parser of a command whose options are the dataclass ``options``."""
    parser = Parser(prog=prog, description=description, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_options(parser, options)
    return parser


def parse(options: type[T], argv: Sequence[str], prog: str, description: str = "") -> T:
    """``argv`` parsed into an instance of the dataclass ``options``."""
    values = vars(build_parser(options, prog, description).parse_args(list(argv)))
    hints = typing.get_type_hints(options)
    for name, value in values.items():  # argparse gives lists for nargs=N
        if typing.get_origin(_kind(hints[name])) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return options(**values)
