"""Command-line options made from the configuration's fields: names, types, choices, defaults and help.

An option's argparse default is None, so the configuration's own default (and its check)
applies; the help text shows that default as the configuration declares it.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic.fields import FieldInfo

from tnflow.tasks.config.options import DataConfig, RunConfig
from tnflow.tasks.config.parameters import option, value_type
from tnflow.tasks.config.sweeps import SweepConfig


def add_config_options(parser: argparse.ArgumentParser, model: type[DataConfig]) -> None:
    """One option per configuration field, grouped as the configuration classes are."""
    groups = {
        DataConfig: parser.add_argument_group("data"),
        RunConfig: parser.add_argument_group("model, training and champion"),
        SweepConfig: parser.add_argument_group("trials"),
    }
    for name, field in model.model_fields.items():
        owner = next(c for c in (DataConfig, RunConfig, SweepConfig) if name in c.model_fields)
        groups[owner].add_argument(option(name), dest=name, help=_help(field), **_argument(field))


def _argument(field: FieldInfo) -> dict[str, Any]:
    kind = value_type(field)  # X of X | None: the option takes an X
    if kind is bool:
        if field.default is None:  # tri-state: yes, no, or decided from other options
            return {"action": argparse.BooleanOptionalAction, "default": None}
        return {"action": "store_true", "default": None}
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if typing.get_origin(kind) is list:  # several values after one option
        return {"nargs": "+", "metavar": extra.get("metavar") or "VALUE", "default": None}
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind), "default": None}
    metavar = extra.get("metavar") or {int: "N", float: "X"}.get(kind, "VALUE")
    return {"type": kind, "metavar": metavar, "default": None}


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if "(default:" in text or field.default_factory is not None:
        return text
    default = field.default
    shown = (
        {True: "on", False: "off", None: "none"}.get(default, default) if isinstance(default, bool | None) else default
    )
    return f"{text} (default: {shown})"
