"""One way to declare options: a frozen dataclass whose fields carry their help as metadata.

Every job and tool declares its flags once, as a config dataclass:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class TrainConfig:
        data: str = option(help="shard folder (local or gs://...)")              # required: no default
        batch_size: int = option(64, help="samples per step (global)")
        recipe: str = option("snapgen_kd", help="distillation recipe", choices=RECIPES)
        guidance_range: tuple[float, ...] | None = option(None, help="LO,HI")  # comma-separated on the command line

and gets its command line from it:

    cfg, rest = parse(TrainConfig, argv, prog="distill train")    # argparse; rest = unknown flags
    class DumpOptions(beam_options(DumpConfig)): ...              # the same flags as Beam PipelineOptions
    cfg = from_mapping(DumpConfig, pipeline_options.get_all_options())

A command that shares flags with another declares them once, on one config, and reuses them on
the other (the same type, default and help; ``reuse`` goes under ``@dataclasses.dataclass``)::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    @reuse(TrainConfig, "batch_size", "seed")            # EvolveConfig.batch_size is TrainConfig's flag
    class EvolveConfig:
        iterations: int = option(4, help="...")

Each field gives ``--snake_case`` and ``--kebab-case`` spellings. Types come from the annotations:
``str``, ``int``, ``float``, ``bool`` (``--flag``, ``--flag true|false``), ``X | None`` (``none``
clears it), and tuples
(comma-separated values). A bad value or an unknown choice is a ``UserError`` naming the flag, so
every command reports it as one line (``core.errors``). Validation of values against
each other belongs in the dataclass's ``__post_init__``, which should raise ``UserError`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing

from core.errors import UserError


def option(default=dataclasses.MISSING, *, help: str, choices=None, repeat: bool = False):  # noqa: A002
    """A dataclass field with its command-line help; no default = a required flag.

    ``choices`` restricts the value; ``repeat`` makes a tuple flag repeatable (``--input a --input b``)
    instead of comma-separated. Mutable defaults are not allowed: use tuples.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "repeat": repeat}
    return dataclasses.field(default=default, metadata=meta)


def reuse(source, *names: str):
    """Class decorator: the fields ``names`` of the config dataclass ``source`` declared on the
    decorated class as well (same annotation, default and help metadata), after its own fields.

    Validation stays with ``source`` (build one from the decorated config in ``__post_init__``).
    A name ``source`` lacks, or one the class declares itself, is a ``TypeError`` at import time.
    The decorated class's ``REUSED`` attribute lists the names (with those of an earlier ``reuse``).
    """
    hints = typing.get_type_hints(source)
    fields = {f.name: f for f in dataclasses.fields(source)}
    unknown = [n for n in names if n not in fields or "help" not in fields[n].metadata]
    if unknown:
        raise TypeError(f"reuse: {source.__name__} has no option field(s) {unknown}")

    def decorate(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        clash = [n for n in names if n in own]
        if clash:
            raise TypeError(f"reuse: {cls.__name__} declares {clash} itself and reuses them from {source.__name__}")
        for name in names:
            f = fields[name]
            own[name] = hints[name]
            setattr(cls, name, dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        cls.__annotations__ = own
        cls.REUSED = tuple(getattr(cls, "REUSED", ())) + tuple(names)
        return cls

    return decorate


def did_you_mean(name: str, known) -> str:
    """`` (did you mean --x?)`` naming the known flag nearest to ``name``, or "" when none is near."""
    close = difflib.get_close_matches(name, [k for k in known if k not in ("-h", "--help")], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def flags_of(parser: argparse.ArgumentParser) -> list[str]:
    """Every spelling of every flag a parser declares (``--snake_case``, ``--kebab-case``, ``-h``)."""
    return list(parser._option_string_actions)  # argparse's registry of flags


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 (argparse's hook)
        raise UserError(message)

    def parse_args(self, args=None, namespace=None):
        # argparse's own message, plus the flag meant: a typo is the usual unknown flag
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            first = next((a.split("=", 1)[0] for a in rest if a.startswith("-")), "")
            raise UserError(f"unrecognized arguments: {' '.join(rest)}{did_you_mean(first, flags_of(self))}")
        return ns


def parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


parse_bool.__name__ = "bool"  # argparse names the converter in "invalid bool value"


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp):
    if tp is bool:
        return parse_bool
    if tp in (str, int, float):
        return tp
    raise TypeError(f"options: unsupported field type {tp!r}")


def _none_or(conv):
    """An optional field's converter: ``none``/``null`` (any case) clear it, as ``null`` does in a JSON config."""

    def parse_optional(text):
        if str(text).strip().lower() in ("none", "null"):
            return None
        return conv(text)

    parse_optional.__name__ = conv.__name__
    return parse_optional


def _converter(tp, repeat: bool):
    """(argparse type, is_tuple) for an annotation."""
    tp, optional = _unwrap_optional(tp)
    if optional and typing.get_origin(tp) is not tuple:
        return _none_or(_scalar(tp)), False
    if typing.get_origin(tp) is tuple:
        item = _scalar(typing.get_args(tp)[0])
        if repeat:
            return item, True

        def parse_list(text: str):
            return tuple(item(x.strip()) for x in str(text).split(",") if x.strip())

        parse_list.__name__ = f"comma-separated {item.__name__}"
        return parse_list, True
    return _scalar(tp), False


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and "help" in f.metadata]


def add_arguments(parser, cls, *, defaults: bool = True, shared: bool = False) -> None:
    """Add one flag per ``option`` field of ``cls`` to an argparse parser (or Beam's).

    With ``defaults=False`` an unset flag is absent from the result (``argparse.SUPPRESS``), so the
    dataclass's own default applies, which lets a ``--config`` file or a preset fill it in first.
    ``shared=True`` is for Beam's parser, which every ``PipelineOptions`` subclass in the process
    adds to: a flag another job already declared is left to it, and no flag is required there
    (the dataclass reports a missing value when it is built).
    """
    for field, tp in _fields(cls):
        meta = field.metadata
        if shared and f"--{field.name}" in parser._option_string_actions:  # argparse's registry of flags
            continue
        conv, is_tuple = _converter(tp, meta["repeat"])
        kw: dict = {"dest": field.name, "help": meta["help"]}
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and shared:
            required, kw["default"] = False, None
        if required:
            kw["required"] = True
        elif shared and "default" in kw:
            pass
        elif not defaults:
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = field.default
        if _unwrap_optional(tp)[0] is bool:
            kw.update(nargs="?", const=True, type=conv, metavar="true|false")
        elif is_tuple and meta["repeat"]:
            kw.update(action="append", type=conv)
            if defaults and not required:
                kw["default"] = None
        else:
            kw["type"] = conv
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        if not required and defaults and field.default not in (None, "", ()) and "%(default)" not in kw["help"]:
            kw["help"] += " (default: %(default)s)"
        parser.add_argument(f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else []), **kw)


def from_mapping(cls, values: dict, **overrides):
    """Build ``cls`` from a mapping that may hold other keys (argparse namespace, Beam's options).

    A required field missing from ``values`` (or ``None`` there) is a ``UserError`` naming its flag.
    """
    kwargs = {}
    for field, _ in _fields(cls):
        if field.default is dataclasses.MISSING and values.get(field.name) is None and field.name not in overrides:
            raise UserError(f"the following arguments are required: --{field.name}")
        if field.name in values:
            value = values[field.name]
            if field.metadata["repeat"] and isinstance(value, list):
                value = tuple(value)
            if value is None and field.metadata["repeat"] and field.default is not dataclasses.MISSING:
                value = field.default
            kwargs[field.name] = value
    kwargs.update(overrides)
    return cls(**kwargs)


def build_parser(cls, *, prog: str, description: str | None = None, defaults: bool = True,
                 passthrough: bool = False) -> argparse.ArgumentParser:
    """A parser of ``cls``'s flags. ``passthrough`` (a job that hands unknown flags on): no flag is
    required by the parser, so the unknown ones can be vetted first (a missing ``--prompts`` may be
    a misspelt one); ``from_mapping`` then reports a required flag still missing."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)  # a prefix never selects a flag
    add_arguments(parser, cls, defaults=defaults, shared=passthrough)
    return parser


def parse(cls, argv: list[str] | None, *, prog: str, description: str | None = None, known_only: bool = False,
          check_unknown=None):
    """Parse ``argv`` into ``cls``; returns ``(config, unknown args)``.

    Unknown flags are an error unless ``known_only`` (Beam jobs pass runner flags through); then
    ``check_unknown(unknown args, the parser's flags)`` vets them before the config is built
    (``pipelines.common.check_beam_args``: each must be one of Beam's).
    """
    if not known_only:
        return from_mapping(cls, vars(build_parser(cls, prog=prog, description=description).parse_args(argv))), []
    parser = build_parser(cls, prog=prog, description=description, passthrough=True)
    ns, rest = parser.parse_known_args(argv)
    if check_unknown is not None:
        check_unknown(rest, flags_of(parser))
    return from_mapping(cls, vars(ns)), rest


def beam_options(cls):
    """A Beam ``PipelineOptions`` subclass declaring ``cls``'s flags (imports Beam only when called)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    class _Options(PipelineOptions):
        @classmethod
        def _add_argparse_args(cls_, parser):  # noqa: N805 (Beam's hook)
            add_arguments(parser, cls, defaults=True, shared=True)

    _Options.__name__ = f"{cls.__name__}Options"
    _Options.__qualname__ = _Options.__name__
    return _Options


def differing_fields(old: dict, new: dict, ignore=()) -> list[str]:
    """Sorted keys whose values differ between two saved settings (a key missing on one side differs),
    leaving out ``ignore``: what every re-run guard names in its one-line refusal."""
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
