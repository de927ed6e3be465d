"""Typed settings shared by every adloop process.

Each process declares one ``pydantic_settings.BaseSettings`` subclass. Values come,
in increasing priority, from defaults (which run the embedded stack), environment
variables (``ADLOOP_<FIELD>``) and command-line flags (``--field-name``).
:func:`add_settings_arguments` derives the flags from the model's fields so the
two never drift apart.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


def cache_dir() -> Path:
    """Where adloop keeps state that outlives a checkout (jars, venvs, run data)."""
    base = os.environ.get("ADLOOP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adloop"
    )
    return Path(base)


class KafkaSettings(BaseSettings):
    """How a process reaches Kafka. Embedded into each process's settings."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    """Prepended to every topic name; tests give each test its own prefix."""
    client_id: str = "adloop"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is not None:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _arg_type(args[0])
        return str
    if annotation in (int, float, str):
        return annotation
    if annotation is Path:
        return Path
    return str


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """Add one ``--flag`` per settings field; defaults stay ``None`` so env/defaults win."""
    group = parser.add_argument_group(f"{cls.__name__} (env ADLOOP_<NAME>)")
    for name, field in cls.model_fields.items():
        help_text = field.description or ""
        if field.annotation is bool:
            group.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: {field.default})",
            )
            continue
        group.add_argument(
            _flag(name), dest=name, type=_arg_type(field.annotation), default=None,
            help=f"{help_text} (default: {field.default})",
        )


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """Build ``cls`` from env and defaults, overridden by the flags that were given."""
    given = {
        name: getattr(args, name)
        for name in cls.model_fields
        if getattr(args, name, None) is not None
    }
    return cls(**given)
