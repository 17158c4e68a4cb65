"""``--help`` of every command and job: flags grouped under their sections, each flag once, every
flag's default shown as it is typed, and a bad choice refused by argparse in one line that lists the
choices as ``--help`` does (``a|b|c``)."""

import dataclasses
import re

import pytest

from core import options
from core.errors import UserError
from diffusion_distill import cli

# verb (and the arguments before --help) -> section headings its help must show
COMMANDS = {
    ("train",): ["data and output:", "the recipe:", "optimisation:", "adversarial recipes (snapgen_adv, ufogen, flow_ladd, flow_step_adv):"],
    ("curate",): ["input and output:", "caption rules:", "CLIP embeddings (open_clip):", "semantic dedup (SemDeDup):"],
    ("dump",): ["input and output:", "teacher and sampling:", "what is recorded:", "compute:"],
    ("filter",): ["input and output:", "score thresholds:", "semantic dedup (SemDeDup):"],
    ("evolve",): ["data and output:", "latency target:", "validation (scoring blocks):", "optimisation:"],
    ("eval",): ["inputs and output:", "generation:", "metrics:"],
    ("profile",): ["models and sizes:", "latency lookup table (students/cost/lookup.py):"],
    ("demo",): ["output:", "the stages:"],
    ("export",): ["checkpoint and output:", "what is exported:"],
    ("export", "--format", "onnx"): ["checkpoint and output:", "what is exported:"],
    ("generate",): ["model:", "image:"],
    ("inspect",): ["dataset:", "checks and output:"],
}


def help_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0, argv
    return capsys.readouterr().out


def entries(text: str) -> list[tuple[str, str]]:
    """(flag, its help text) for every option in an argparse help (an entry runs until the next flag)."""
    found, current = [], None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)(.*)$", line)
        if m:
            current = [m.group(1), m.group(2)]
            found.append(current)
        elif current is not None and line.startswith("   "):
            current[1] += " " + line.strip()
        else:  # a heading, a gap or the epilog ends the entry
            current = None
    return [(flag, " ".join(help_.split())) for flag, help_ in found]


@pytest.mark.parametrize("argv", list(COMMANDS), ids=" ".join)
def test_help_is_grouped_with_each_flag_once_and_every_default_shown(capsys, argv):
    out = help_of(capsys, list(argv))
    for heading in COMMANDS[argv]:
        assert f"\n{heading}\n" in out, (heading, out)
    flags = [flag for flag, _ in entries(out)]
    assert len(flags) > 3 and len(flags) == len(set(flags)), flags  # each flag once
    assert not [f for f in flags if re.match(r"--\w+-\w", f)], flags  # no kebab alias listed
    assert not re.search(r"--[a-z0-9]+(_[a-z0-9]+)+ \S+, --[a-z0-9]+-", out)  # "--a_b A_B, --a-b A_B" is gone
    for flag, text in entries(out):
        if flag not in ("-h", "--help"):
            assert re.search(r"\((default: [^)]|required\))", text), (flag, text)
    assert not re.search(r"\{[\w,.-]*\}", out)  # choices as a|b|c, not argparse's {a,b}
    assert not re.search(r"default: (True|False|None)\b|default: \(", out)  # no Python literals


def test_defaults_are_shown_as_they_are_typed(capsys):
    out = " ".join(help_of(capsys, ["eval"]).split())
    assert "--teacher_steps INT,... teacher step counts; () = no teacher rows (default: 50,8,4,1)" in out
    assert "(default: none)" in out and "--weights ema|raw" in out
    out = " ".join(help_of(capsys, ["train"]).split())
    assert "--channels_last [true|false]" in out and "(default: true)" in out and "(default: false)" in out
    assert "--prediction_type ''|epsilon|v_prediction" in out and "(default: '')" in out


def test_curate_shows_the_preset_values_as_defaults(capsys):
    out = " ".join(help_of(capsys, ["curate"]).split())
    assert "--min_words INT" in out and "(default: from --preset, 2 in preset 'default')" in out
    assert "(default: from --preset, true in preset 'default')" in out  # exact_dedup, a bool
    assert "--preset default|laion-aesthetics|" in out and "[Beam pipeline options]" in out


BAD_CHOICES = [
    (["train", "--data", "d", "--output", "o", "--recipe", "snapgen"], "distill train", "--recipe", "'snapgen'"),
    (["dump", "--prompts", "p", "--output", "o", "--progress", "maybe"], "distill dump", "--progress", "'maybe'"),
    (["dump", "--prompts", "p", "--output", "o", "--dtype", "float8"], "distill dump", "--dtype", "'float8'"),
    (["curate", "--input", "p", "--output", "o", "--nsfw", "maybe"], "distill curate", "--nsfw", "'maybe'"),
    (["curate", "--input", "p", "--output", "o", "--allocator", "jemalloc"], "distill curate", "--allocator", "'jemalloc'"),
    (["filter", "--input", "i", "--output", "o", "--progress", "x"], "distill filter", "--progress", "'x'"),
    (["eval", "--output", "o", "--captions", "c", "--weights", "best"], "distill eval", "--weights", "'best'"),
]


@pytest.mark.parametrize("argv, prog, flag, value", BAD_CHOICES, ids=lambda x: x if isinstance(x, str) else None)
def test_a_bad_choice_exits_2_with_one_line_listing_the_choices(capsys, argv, prog, flag, value):
    assert cli.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("WARNING:root")]
    assert len(lines) == 1, lines
    m = re.fullmatch(rf"{prog}: error: {flag} {value} is not one of (\S+)", lines[0])
    assert m and "|" in m.group(1) and "," not in m.group(1), lines[0]
    usage = help_of(capsys, argv[:1])  # the same list as --help shows
    assert f"{flag} {m.group(1)}" in usage


@dataclasses.dataclass(frozen=True, kw_only=True)
class Small:
    name: str = options.option("a", help="one of a, b", choices=("a", "b"))
    kinds: tuple[str, ...] = options.option(("a",), help="some of a, b", choices=("a", "b"))
    maybe: str | None = options.option(None, help="a, b or none", choices=("a", "b"))
    long_name: int = options.option(1, help="a number", section="numbers")


def test_choices_of_tuples_and_optional_flags_and_the_kebab_spelling():
    cfg, _ = options.parse(Small, ["--kinds", "b,a", "--maybe", "none", "--long-name", "3"], prog="t")
    assert (cfg.kinds, cfg.maybe, cfg.long_name) == (("b", "a"), None, 3)  # the dash spelling still parses
    with pytest.raises(UserError, match=r"^--kinds 'c' is not one of a\|b$"):
        options.parse(Small, ["--kinds", "a,c"], prog="t")
    with pytest.raises(UserError, match=r"^--maybe 'c' is not one of a\|b$"):
        options.parse(Small, ["--maybe", "c"], prog="t")
    with pytest.raises(UserError, match=r"^argument --long_name: invalid int value: 'x'$"):  # one spelling named
        options.parse(Small, ["--long-name", "x"], prog="t")
    text = options.build_parser(Small, prog="t").format_help()
    assert "\nnumbers:\n  --long_name INT" in text and "--long-name" not in text
    assert "--kinds a|b" in text and "(default: a)" in text


def test_show_value():
    assert [options.show_value(v) for v in (True, False, None, (1, 2), (), "", "x", 0.5)] == [
        "true", "false", "none", "1,2", "''", "''", "x", "0.5"]
    assert options.not_one_of("--x", "q", ("a", "")) == "--x 'q' is not one of a|''"


def test_every_option_of_the_commands_has_a_section():
    from filters.config import CurateConfig
    from pipelines.curate.job import CurateJobConfig
    from pipelines.dump.job import DumpConfig
    from pipelines.filter.job import FilterConfig
    from students.search.evolve import EvolveConfig
    from students.training.train import TrainConfig

    for cls in (TrainConfig, EvolveConfig, DumpConfig, FilterConfig, CurateJobConfig, CurateConfig):
        unsectioned = [f.name for f in dataclasses.fields(cls) if "help" in f.metadata and not f.metadata["section"]]
        assert not unsectioned, (cls.__name__, unsectioned)
