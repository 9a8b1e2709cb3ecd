"""Declare a setting once: its type, default, bounds, env var, flag and help.

A settings class is a pydantic model (`Settings`) whose fields are made with `setting()`.
Everything else is derived from those fields: the env vars `from_env()` reads, the
argparse flags `add_flags()` adds (their help shows the default and the env var),
the merge `from_args()` does (flag > env > default), and docs/configuration.md. A bad
value is one `SettingsError` line naming the flag or env var; nothing is coerced silently.

    class EngineSettings(Settings):
        section: ClassVar[str] = "engine"
        max_num_seqs: int = setting(64, ge=1, help="most sequences in one batch")

gives `--max-num-seqs N` and `JETSERVE_MAX_NUM_SEQS` (derived from the field name; a
trailing `_s` for seconds is dropped). `env=` / `flag=` name them explicitly, `env=None`
declares a per-invocation argument with no env var, `flag=None` an env-only setting
(secrets, which must not show up in `ps`).
"""

from __future__ import annotations

import argparse
import inspect
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

ENV_PREFIX = "JETSERVE_"
DERIVED = "*"  # env/flag not given: derived from the field name
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A bad setting, as one line that names the flag or env var it came from."""


def parse_bool(raw: str) -> bool:
    """The one boolean parser: 1/true/yes/on or 0/false/no/off, anything else is an error."""
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {raw!r}")


def setting(
    default: Any = ...,
    *,
    help: str,
    env: str | None = DERIVED,
    flag: str | None = DERIVED,
    default_factory: Any = None,
    shown_default: str | None = None,
    positional: bool = False,
    metavar: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A settings field. No `default` (and no factory) makes it required."""
    extra = {
        "env": env,
        "flag": flag,
        "shown_default": shown_default,
        "positional": positional,
        "metavar": metavar,
    }
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not None:
        return Field(
            default_factory=default_factory, description=help, json_schema_extra=extra, **bounds
        )
    return Field(default, description=help, json_schema_extra=extra, **bounds)


def same_as(cls: type[Settings], name: str, **overrides: Any) -> Any:
    """Reuse field `name` of `cls` in another class (declared there once); `help`, `flag`,
    `env`, `shown_default` and `default` may be overridden."""
    source = cls.model_fields[name]
    opt = next(o for o in options(cls) if o.name == name)
    extra = dict(source.json_schema_extra or {})  # type: ignore[arg-type]
    extra.update(env=opt.env, flag=opt.flag)
    for key in ("env", "flag", "shown_default"):
        if key in overrides:
            extra[key] = overrides.pop(key)
    if "help" in overrides:
        overrides["description"] = overrides.pop("help")
    return FieldInfo.merge_field_infos(source, json_schema_extra=extra, **overrides)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False


def _fmt(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ByteSize):
        return value.human_readable(separator=" ").replace(".0 ", " ")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(map(str, value)) if value else "empty"
    if value == "":
        return "empty"
    return str(value)


@dataclass(frozen=True)
class Option:
    """One declared setting, with everything derived from its field."""

    name: str
    owner: type  # the class that declares it: its section in --help and the docs
    field: FieldInfo
    flag: str | None
    env: str | None
    positional: bool
    metavar_override: str | None
    shown_default_override: str | None

    @property
    def help(self) -> str:
        return self.field.description or ""

    @property
    def base(self) -> Any:
        return _strip_optional(self.field.annotation)[0]

    @property
    def kind(self) -> str:
        base = self.base
        if base is bool:
            return "bool"
        if get_origin(base) is list:
            return "list"  # a repeatable flag; comma-separated in the env var
        if get_origin(base) is tuple:
            return "csv"
        if base is ByteSize:
            return "bytes"
        if get_origin(base) is Literal:
            return "choice"
        return "value"

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(str(c) for c in get_args(self.base)) if self.kind == "choice" else ()

    @property
    def required(self) -> bool:
        return self.field.is_required()

    @property
    def default(self) -> Any:
        return self.field.get_default(call_default_factory=False)

    @property
    def shown_default(self) -> str:
        if self.shown_default_override is not None:
            return self.shown_default_override
        return "required" if self.required else _fmt(self.default)

    @property
    def type_name(self) -> str:
        base = self.base
        if self.kind == "choice":
            return "|".join(self.choices)
        if self.kind in ("list", "csv"):
            return "list (comma-separated)" if self.kind == "csv" else "text (repeatable)"
        if self.kind == "bytes":
            return "bytes (512MiB, 8GiB, ...)"
        if base is float and self.name.endswith("_s"):
            return "seconds"
        return {bool: "bool", int: "int", float: "number", str: "text"}.get(base, str(base))

    @property
    def metavar(self) -> str | None:
        if self.metavar_override:
            return self.metavar_override
        if self.kind == "choice":
            return "{" + ",".join(self.choices) + "}"
        base = self.base
        if self.kind == "bytes":
            return "BYTES"
        if base is float and self.name.endswith("_s"):
            return "SECONDS"
        return {int: "N", float: "X"}.get(base, self.name.removesuffix("_s").upper())

    @property
    def bounds(self) -> str:
        words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        parts = []
        for m in self.field.metadata:
            for attr, sym in words.items():
                value = getattr(m, attr, None)
                if value is not None:
                    parts.append(f"{sym} {_fmt(value)}")
        return ", ".join(parts)

    @property
    def where(self) -> str:
        """How a person sets it, for error lines: `--flag` / `JETSERVE_X`."""
        names = [n for n in (self.flag if not self.positional else self.name, self.env) if n]
        return " / ".join(names)

    def help_line(self) -> str:
        facts = [self.bounds] if self.bounds else []
        required = self.shown_default == "required"
        facts.append("required" if required else f"default: {self.shown_default}")
        if self.env:
            facts.append(f"env {self.env}")
        return f"{self.help} ({'; '.join(facts)})"

    def parse(self, raw: str) -> Any:
        """A flag's or env var's text as a value of this setting; ValueError says why not."""
        if self.kind == "bool":
            value: Any = parse_bool(raw)
        elif self.kind in ("list", "csv"):
            value = [part.strip() for part in raw.split(",") if part.strip()]
        elif self.kind == "choice":
            lowered = {c.lower(): c for c in self.choices}
            value = lowered.get(raw.strip().lower(), raw)
        else:
            value = raw.strip()
        try:
            return TypeAdapter(self.field.rebuild_annotation()).validate_python(value)
        except ValidationError as e:
            raise ValueError(f"{_first_message(e)}, got {raw!r}") from None


def _first_message(e: ValidationError) -> str:
    msg = e.errors()[0]["msg"].removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _owner(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            return klass
    return cls


def options(cls: type[Settings]) -> list[Option]:
    """Every declared setting of `cls`, inherited ones included, in declaration order."""
    found = []
    for name, fi in cls.model_fields.items():
        extra = dict(fi.json_schema_extra or {})  # type: ignore[arg-type]
        positional = bool(extra.get("positional"))
        flag = extra.get("flag", DERIVED)
        if flag == DERIVED:
            flag = "--" + name.removesuffix("_s").replace("_", "-")
        if positional:
            flag = None
        env = extra.get("env", DERIVED)
        if env == DERIVED:
            env = (flag or name).lstrip("-").upper().replace("-", "_")
        if env is not None and not env.startswith(ENV_PREFIX):
            env = ENV_PREFIX + env
        found.append(
            Option(
                name=name,
                owner=_owner(cls, name),
                field=fi,
                flag=flag,
                env=env,
                positional=positional,
                metavar_override=extra.get("metavar"),
                shown_default_override=extra.get("shown_default"),
            )
        )
    return found


def explain(cls: type[Settings], e: ValidationError) -> str:
    """A pydantic error as one line that names the flag / env var of each bad field."""
    by_name = {o.name: o for o in options(cls)}
    parts = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = err.get("loc") or ()
        opt = by_name.get(str(loc[0])) if loc else None
        if opt is not None and err["type"] == "missing":
            parts.append(f"{opt.where} is required")
        elif opt is not None:
            parts.append(f"{opt.where}: {msg[:1].lower() + msg[1:]}, got {err.get('input')!r}")
        else:
            parts.append(msg)
    return "; ".join(parts)


class Settings(BaseModel):
    """Base of every settings class: frozen, unknown names rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    section: ClassVar[str] = ""  # heading of this class's own fields in --help and the docs

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Env vars over defaults; an empty env var counts as unset."""
        return cls.load({}, environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Self:
        """Flags over env vars over defaults (flags absent from `args` were not given)."""
        given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
        return cls.load(given, environ)

    @classmethod
    def load(cls, given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Self:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for opt in options(cls):
            raw = environ.get(opt.env, "") if opt.env else ""
            if raw.strip() == "" or opt.name in given:
                continue
            try:
                values[opt.name] = opt.parse(raw)
            except ValueError as e:
                raise SettingsError(f"{opt.env}: {e}") from None
        values.update(given)
        try:
            return cls(**values)
        except ValidationError as e:
            raise SettingsError(explain(cls, e)) from None

    def is_set(self, name: str) -> bool:
        """Whether `name` was given (flag, env var or constructor), not left at its default."""
        return name in self.model_fields_set


def add_flags(parser: argparse.ArgumentParser, *classes: type[Settings]) -> None:
    """Add one flag per declared setting of `classes`, grouped by the class declaring it.

    Flags default to SUPPRESS, so a flag not given never hides an env var; each action
    carries its `Option` (``action.option``) for the generated reference.
    """
    groups: dict[type, Any] = {}
    seen: set[str] = set()
    for cls in classes:
        # The class's own flags first, then each base's, as the MRO orders them.
        ranked = sorted(options(cls), key=lambda o: cls.__mro__.index(o.owner))
        for opt in ranked:
            if opt.name in seen or (opt.flag is None and not opt.positional):
                continue
            seen.add(opt.name)
            if opt.owner not in groups:
                title = getattr(opt.owner, "section", "") or opt.owner.__name__
                groups[opt.owner] = parser.add_argument_group(title)
            action = _add(groups[opt.owner], opt)
            action.option = opt  # type: ignore[attr-defined]


def _add(group: Any, opt: Option) -> argparse.Action:
    help_text = opt.help_line().replace("%", "%%")
    if opt.positional:
        return group.add_argument(
            opt.name, type=_flag_type(opt), help=help_text, metavar=opt.metavar
        )
    kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS, "help": help_text}
    if opt.kind == "bool":
        return group.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kwargs)
    if opt.kind == "list":
        kwargs["action"] = "append"
    else:
        kwargs["type"] = _flag_type(opt)
    if opt.required and opt.env is None:
        kwargs["required"] = True
    return group.add_argument(opt.flag, metavar=opt.metavar, **kwargs)


def _flag_type(opt: Option) -> Any:
    def convert(raw: str) -> Any:
        try:
            return opt.parse(raw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def to_argv(settings: Settings, classes: Iterable[type[Settings]]) -> list[str]:
    """The flags that reproduce the fields of `classes` that `settings` has explicitly set
    (the launcher hands them on to the processes it starts)."""
    argv: list[str] = []
    for cls in classes:
        for opt in options(cls):
            if opt.flag is None or not settings.is_set(opt.name):
                continue
            value = getattr(settings, opt.name)
            if opt.kind == "bool":
                argv.append(opt.flag if value else "--no-" + opt.flag[2:])
            elif value is None:
                continue
            elif opt.kind == "list":
                for item in value:
                    argv += [opt.flag, str(item)]
            elif opt.kind == "csv":
                argv += [opt.flag, ",".join(value)]
            else:
                argv += [opt.flag, str(value)]
    return argv
