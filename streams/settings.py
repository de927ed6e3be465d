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
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


def cache_dir() -> Path:
    """Where adloop keeps state that outlives a checkout (jars, venvs, run data)."""
    base = os.environ.get("ADLOOP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adloop"
    )
    return Path(base)


def env_secret(name: str) -> SecretStr | None:
    """Environment variable ``name`` as a secret (None when unset or empty): for settings
    that must never come from a flag, where they would show in the process list."""
    value = os.environ.get(name)
    return SecretStr(value) if value else None


def env_path(name: str) -> Path | None:
    """Environment variable ``name`` as a path (None when unset or empty)."""
    value = os.environ.get(name)
    return Path(value) if value else None


class KafkaSettings(BaseSettings):
    """How a process reaches Kafka. Embedded into each process's settings.

    PLAINTEXT by default (the embedded broker); TLS and SASL for a secured cluster
    (docs/security.md). The SASL password is read from the environment only
    (``ADLOOP_SASL_PASSWORD``), never from a flag, and never printed.
    """

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    """Prepended to every topic name; tests give each test its own prefix."""
    client_id: str = "adloop"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (with SASL_PLAINTEXT / SASL_SSL)")
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (environment ADLOOP_SASL_PASSWORD only)")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers")
    ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="client key (mutual TLS)")
    metadata_max_age_ms: int = Field(
        3000, ge=100, description="how often every client refreshes its cluster metadata: "
        "the longest a consumer started before its topic exists waits to find it (Kafka's "
        "default is 5 minutes)")
    bootstrap_timeout_ms: int = Field(
        30000, ge=100, description="how long a client waits for its first connection to the "
        "cluster before it fails (and its owner retries, counted)")
    topic_wait_s: float = Field(
        120.0, gt=0, description="how long a process waits at start-up for its input topics "
        "to exist (`adloop topics create`) before it exits with that advice")

    def model_post_init(self, _ctx: object) -> None:
        if self.security_protocol.startswith("SASL_") and not (
                self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs "
                             "sasl_mechanism, sasl_username and ADLOOP_SASL_PASSWORD")

    def security_config(self) -> dict[str, Any]:
        """kafka-python client arguments for TLS / SASL (none for PLAINTEXT)."""
        cfg: dict[str, Any] = {}
        if self.security_protocol == "PLAINTEXT":
            return cfg
        cfg["security_protocol"] = self.security_protocol
        if self.security_protocol.startswith("SASL_"):
            assert self.sasl_password is not None
            cfg.update(sasl_mechanism=self.sasl_mechanism,
                       sasl_plain_username=self.sasl_username,
                       sasl_plain_password=self.sasl_password.get_secret_value())
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                cfg[name] = str(value)
        return cfg

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """Arguments for any kafka-python client of this cluster (plus ``extra``)."""
        return {"bootstrap_servers": self.bootstrap_servers,
                "metadata_max_age_ms": self.metadata_max_age_ms,
                "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
                **self.security_config(), **extra}


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


def _default_text(field: Any) -> str:
    """The default shown in ``--help``: a factory's value, never pydantic's sentinel."""
    if field.default_factory is not None:
        try:
            return str(field.default_factory())
        except Exception:  # a factory that needs validated data: say so, do not guess
            return "computed"
    return str(field.default)


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """Add one ``--flag`` per settings field; defaults stay ``None`` so env/defaults win."""
    group = parser.add_argument_group(f"{cls.__name__} (env ADLOOP_<NAME>)")
    for name, field in cls.model_fields.items():
        if SecretStr in (field.annotation, *get_args(field.annotation)):
            continue   # secrets come from the environment only, never from a flag
        help_text = field.description or ""
        if field.annotation is bool:
            group.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: {_default_text(field)})",
            )
            continue
        group.add_argument(
            _flag(name), dest=name, type=_arg_type(field.annotation), default=None,
            help=f"{help_text} (default: {_default_text(field)})",
        )


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """Build ``cls`` from env and defaults, overridden by the flags that were given."""
    given = {
        name: getattr(args, name)
        for name in cls.model_fields
        if getattr(args, name, None) is not None
    }
    return cls(**given)
