"""How the declared options become command-line options' errors, flow signatures and one-line messages.

The option table (`tasks.config.options`) declares each option once, as a pydantic field;
this module is the machinery around it: `Configuration.from_values` builds a configuration
from flow parameters or parsed options and turns pydantic's errors into one line naming the
command-line option, and `flow_parameters` gives a flow the fields as keyword parameters, so
Prefect shows and checks them (the UI form, the deployment's schema).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
)

from tnflow.tasks.core.errors import ConfigError
from tnflow.tasks.core.files import is_utf8, shown_name

NAME_CHARACTERS = "may only hold letters, digits, '-' and '_'"  # what a pattern-checked name allows


class Configuration(BaseModel):
    """What every configuration shares: frozen, strict, and built from flow parameters or parsed options in one way.

    `model_fields_set` is what the user gave: defaults that follow other options are resolved
    after validation, without counting as given (a sweep's trial builds its configuration from
    what was given again, so those defaults follow the trial's options).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _text_prefect_can_send(cls, value: Any, info: ValidationInfo) -> Any:
        """A run's options travel to Prefect as JSON text, which cannot hold a path of another system's encoding."""
        if isinstance(value, str) and not is_utf8(value):
            raise ValueError(
                f"{option(info.field_name or '')} {shown_name(value)} is not valid UTF-8 (a name in another "
                "system's encoding), and a run's options travel to Prefect as text: rename it, or link it "
                "under a UTF-8 name (ln -s)"
            )
        return value

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Self:
        """Build from flow parameters or parsed options; None means the default."""
        given = {k: v for k, v in values.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise _config_error(cls, exc) from None


def option(name: str) -> str:
    """The command-line spelling of a field."""
    return "--" + name.replace("_", "-")


def _config_error(model: type[BaseModel], exc: ValidationError) -> ConfigError:
    """The first problem as one line that names the command-line option."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        known = ", ".join(sorted(model.model_fields))
        return ConfigError(f"unknown option(s): {', '.join(unknown)}; known: {known}")
    error = errors[0]
    if error["type"] == "value_error":
        return ConfigError(str(error["ctx"]["error"]))
    name = str(error["loc"][0]) if error["loc"] else ""
    value = error.get("input")
    field = model.model_fields.get(name)
    kind = value_type(field) if field else str
    if error["type"] == "literal_error":
        return ConfigError(f"{option(name)} {value!r} is unknown; choose one of: {error['ctx']['expected']}")
    if error["type"] == "string_pattern_mismatch":  # names Prefect takes, unless the field says what it expects
        extra = field.json_schema_extra if field and isinstance(field.json_schema_extra, dict) else {}
        return ConfigError(f"{option(name)} {value!r} {extra.get('pattern_says', NAME_CHARACTERS)}")
    if kind is bool:
        return ConfigError(f"{option(name)} must be true or false, got {value!r}")
    return ConfigError(f"{option(name)} must be {KIND_NAMES.get(kind, 'a string')}{_span(field)}, got {value!r}")


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def value_type(field: Any) -> Any:
    """What one value of an option is: X of `X | None`, else the annotation (bool, int, float, str, Literal[...], ...).

    The one reading of a field's type: the command line's parsing, the errors and a sweep's grid values use it.
    """
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind  # a checked type: its X


def _span(field: Any) -> str:
    bounds = {}
    for constraint in field.metadata if field else []:
        for name in ("ge", "gt", "le", "lt"):
            if hasattr(constraint, name):
                bounds[name] = getattr(constraint, name)
    if "le" in bounds:
        return f" from {bounds.get('ge')} to {bounds['le']}"
    if "lt" in bounds:
        return f" from {bounds.get('ge')} to below {bounds['lt']}"
    if "gt" in bounds:
        return f" above {bounds['gt']}"
    return f" of at least {bounds['ge']}" if "ge" in bounds else ""


# -- flow parameters ----------------------------------------------------------------------

R = TypeVar("R")
CHECKS = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)  # not for None, which a parameter may be


def flow_parameters(model: type[Configuration]) -> Callable[[Callable[[Any], R]], Callable[..., R]]:
    """Give `fn(config)` the model's fields as keyword parameters, which Prefect shows and validates.

    Prefect builds a flow's parameter schema (the UI form, `prefect deployment run -p`) from
    its signature; this signature is the model's fields, with their types, bounds and help.
    Fields whose default depends on the environment (directories) default to None there and
    are resolved when the run starts, on the machine that runs it.
    """

    def decorate(fn: Callable[[Any], R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def with_fields(**values: Any) -> R:
            return fn(model.from_values(values))

        parameters, documented = [], []
        for name, field in model.model_fields.items():
            if field.is_required():  # no default: Prefect asks for it (the folder to score)
                default = inspect.Parameter.empty
            else:
                default = None if field.default_factory is not None else field.default
            annotation = field.annotation if default is not None or _optional(field) else field.annotation | None
            kind = inspect.Parameter.KEYWORD_ONLY
            bounds = [m for m in field.metadata if not isinstance(m, CHECKS)]  # the checks run in the configuration
            if bounds:  # Prefect shows them and checks them before the run starts
                annotation = Annotated[annotation, *bounds]
            parameters.append(inspect.Parameter(name, kind, default=default, annotation=annotation))
            documented.append(f"    {name}: {field.description}")
        returns = inspect.signature(fn).return_annotation
        with_fields.__signature__ = inspect.Signature(parameters, return_annotation=returns)
        with_fields.__doc__ = f"{inspect.getdoc(fn)}\n\nArgs:\n" + "\n".join(documented)  # the UI's help texts
        return with_fields

    return decorate


def _optional(field: Any) -> bool:
    return type(None) in getattr(field.annotation, "__args__", ())
