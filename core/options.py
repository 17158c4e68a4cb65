"""One way to declare options: a frozen dataclass whose fields carry their help as metadata.

Every job and tool declares its flags once, as a config dataclass:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class TrainConfig:
        data: str = option(help="shard folder (local or gs://...)")              # required: no default
        batch_size: int = option(64, help="samples per step (global)")
        recipe: str = option("snapgen_kd", help="distillation recipe", choices=RECIPES, section="recipe")
        guidance_range: tuple[float, ...] | None = option(None, help="per-sample weight", metavar="LO,HI")

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
every command reports it as one line (``core.errors``): ``--recipe 'x' is not one of a|b|c``, the
choices listed as ``--help`` lists them. Validation of values against each other belongs in the
dataclass's ``__post_init__``, which should raise ``UserError`` too.

``--help`` groups the flags by their ``section`` (argparse argument groups, in the order the
sections first appear; a field without one is under "options"), prints each flag once (the
``--kebab-case`` spelling is accepted but not listed) and shows every flag's default as it is typed
(``true``/``false``, ``a,b,c``, ``none``, ``''``), or ``required``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import textwrap
import types
import typing

from core.errors import UserError


def option(default=dataclasses.MISSING, *, help: str, choices=None, repeat: bool = False,  # noqa: A002
           section: str | None = None, metavar: str | None = None):
    """A dataclass field with its command-line help; no default = a required flag.

    ``choices`` restricts the value (argparse checks it; each item of a tuple flag); ``repeat`` makes
    a tuple flag repeatable (``--input a --input b``) instead of comma-separated. ``section``: the
    heading ``--help`` lists the flag under; ``metavar``: how ``--help`` names its value (default:
    from the type). Mutable defaults are not allowed: use tuples.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "repeat": repeat,
            "section": section, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def show_value(value) -> str:
    """A value as it is typed on the command line: ``true``/``false``, ``none``, ``a,b,c``, ``''``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(show_value(v) for v in value) or "''"
    if value == "":
        return "''"
    return str(value)


def choice_list(choices) -> str:
    """Choices as ``--help`` and every error list them: ``a|b|c``."""
    return "|".join(show_value(c) for c in choices)


def not_one_of(flag: str, value, choices) -> str:
    """The one message for a value outside its choices: ``--flag 'x' is not one of a|b|c``."""
    return f"{flag} {value!r} is not one of {choice_list(choices)}"


class Choices(tuple):
    """A flag's allowed values, as argparse's ``choices``: a tuple whose items are all allowed is in it
    (a comma-separated flag), and so is ``None`` for an optional flag (``none`` clears it)."""

    def __new__(cls, values, optional: bool = False):
        self = super().__new__(cls, values)
        self.optional = optional
        return self

    def __contains__(self, value):
        if value is None:
            return self.optional
        if isinstance(value, tuple):
            return all(tuple.__contains__(self, v) for v in value)
        return tuple.__contains__(self, value)


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


class HelpFormatter(argparse.HelpFormatter):
    """Each flag once: an action's ``shown_options`` (its ``--snake_case`` spelling) instead of every
    spelling it accepts."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("max_help_position", 34)
        super().__init__(prog, **kwargs)

    def _format_action_invocation(self, action):
        shown = getattr(action, "shown_options", None)
        if shown:
            action = copy.copy(action)
            action.option_strings = list(shown)
        return super()._format_action_invocation(action)

    def _split_lines(self, text, width):  # never inside a word: flow-euler, hub-org/model-name
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False, break_long_words=False)


_ALIAS = re.compile(r"(--[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+)/--[A-Za-z0-9-]+")  # argparse's "--a_b/--a-b"


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` instead of printing usage and exiting; its messages name a
    flag by one spelling and list choices as ``a|b|c``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D401 (argparse's hook)
        raise UserError(_ALIAS.sub(r"\1", message))

    def _check_value(self, action, value):  # argparse's hook: a value against the flag's choices
        if action.choices is not None and value not in action.choices:
            items = value if isinstance(value, tuple) else (value,)
            bad = next((v for v in items if v not in action.choices), value)
            raise argparse.ArgumentError(None, not_one_of(action.option_strings[0], bad, action.choices))

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


def _metavar(field, tp) -> str | None:
    """How ``--help`` names a flag's value: the field's ``metavar``, ``a|b|c`` for choices, ``INT``,
    ``FLOAT``, ``INT,...`` for a comma-separated tuple; None: argparse's (the name in capitals)."""
    meta = field.metadata
    if meta.get("metavar"):
        return meta["metavar"]
    if meta["choices"] is not None:
        return choice_list(meta["choices"])
    tp = _unwrap_optional(tp)[0]
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        name = {int: "INT", float: "FLOAT"}.get(item, field.name.upper())
        return name if meta["repeat"] else f"{name},..."
    return {int: "INT", float: "FLOAT"}.get(tp)


def _default_note(field, required: bool, preset) -> str | None:
    """What ``--help`` appends to a flag's help about its default (None: its help says it already)."""
    if required:
        return "required"
    if "(default: " in field.metadata["help"] or "%(default)" in field.metadata["help"]:
        return None
    if preset is not None:
        name, config = preset
        return f"default: from --preset, {show_value(getattr(config, field.name))} in preset {name!r}"
    return f"default: {show_value(field.default)}"


def _group(parser, title: str | None):
    """The argument group ``title`` of ``parser`` (made on first use; None: the parser itself)."""
    if title is None:
        return parser
    for group in parser._action_groups:  # argparse's list of groups
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_arguments(parser, cls, *, defaults: bool = True, shared: bool = False, preset=None) -> None:
    """Add one flag per ``option`` field of ``cls`` to an argparse parser (or Beam's), under its section.

    With ``defaults=False`` an unset flag is absent from the result (``argparse.SUPPRESS``), so the
    dataclass's own default applies, which lets a ``--config`` file or a preset fill it in first;
    ``preset``: ``(name, the config that preset makes)``, whose values ``--help`` shows as defaults.
    ``shared=True`` is for Beam's parser, which every ``PipelineOptions`` subclass in the process
    adds to: a flag another job already declared is left to it, and no flag is required there
    (the dataclass reports a missing value when it is built).
    """
    for field, tp in _fields(cls):
        meta = field.metadata
        if shared and f"--{field.name}" in parser._option_string_actions:  # argparse's registry of flags
            continue
        conv, is_tuple = _converter(tp, meta["repeat"])
        kw: dict = {"dest": field.name}
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        note = _default_note(field, required, preset if not defaults else None)
        help_ = meta["help"] if "%(default)" in meta["help"] else meta["help"].replace("%", "%%")
        kw["help"] = f"{help_} ({note})" if note else help_
        if required and shared:
            kw["default"] = None
        elif required:
            kw["required"] = True
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
            kw["choices"] = Choices(meta["choices"], optional=_unwrap_optional(tp)[1])
        metavar = _metavar(field, tp)
        if metavar and "metavar" not in kw:
            kw["metavar"] = metavar
        primary = f"--{field.name}"
        alias = [f"--{field.name.replace('_', '-')}"] if "_" in field.name else []
        action = _group(parser, meta.get("section")).add_argument(primary, *alias, **kw)
        action.shown_options = (primary,)  # --help lists the flag once; the kebab spelling still parses


def usage_of(cls, *, passthrough: bool = False) -> str:
    """``%(prog)s --data DATA --output OUTPUT [options]``: the required flags, then the rest."""
    parts = ["%(prog)s"]
    for field, tp in _fields(cls):
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            parts.append(f"--{field.name} {_metavar(field, tp) or field.name.upper()}")
    parts.append("[options]")
    if passthrough:
        parts.append("[Beam pipeline options]")
    return " ".join(parts)


BEAM_EPILOG = ("Any other flag goes to Beam: --runner=Direct|Dataflow|Dask|Flink|Spark|Prism and the runner's "
               "options (--direct_num_workers, Dataflow's --project, --region, --temp_location, ...); a flag that "
               "is neither this job's nor Beam's is an error.")


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
                 passthrough: bool = False, usage: str | None = None) -> argparse.ArgumentParser:
    """A parser of ``cls``'s flags. ``passthrough`` (a job that hands unknown flags on): no flag is
    required by the parser, so the unknown ones can be vetted first (a missing ``--prompts`` may be
    a misspelt one); ``from_mapping`` then reports a required flag still missing. ``usage``: the
    usage line (default ``usage_of``)."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,  # a prefix never selects a flag
                     usage=usage or usage_of(cls, passthrough=passthrough),
                     epilog=BEAM_EPILOG if passthrough else None)
    add_arguments(parser, cls, defaults=defaults, shared=passthrough)
    return parser


def parse(cls, argv: list[str] | None, *, prog: str, description: str | None = None, known_only: bool = False,
          check_unknown=None, usage: str | None = None):
    """Parse ``argv`` into ``cls``; returns ``(config, unknown args)``.

    Unknown flags are an error unless ``known_only`` (Beam jobs pass runner flags through); then
    ``check_unknown(unknown args, the parser's flags)`` vets them before the config is built
    (``pipelines.common.check_beam_args``: each must be one of Beam's).
    """
    if not known_only:
        parser = build_parser(cls, prog=prog, description=description, usage=usage)
        return from_mapping(cls, vars(parser.parse_args(argv))), []
    parser = build_parser(cls, prog=prog, description=description, passthrough=True, usage=usage)
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
