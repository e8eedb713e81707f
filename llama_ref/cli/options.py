"""One command line per config dataclass: a ``--flag`` for every field, declared with
``llama_ref.train.config.option`` (its help, default and choices in the field's metadata)."""
from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from typing import Any


def dataclass_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A command line with one ``--flag`` per field of the dataclass ``cls`` (declared with ``_opt``): bools as
    ``--x/--no-x``, ``Optional[T]`` as ``T``, choices and help from the field's metadata."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        kw: dict[str, Any] = dict(default=f.default, help=f.metadata["help"] + " (default: %(default)s)")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=base, choices=f.metadata.get("choices"), **kw)
    return parser


