"""Every ``idgbr ...`` command line in README.md and docs/*.md parses with the real command-line parser.

Command lines are taken from fenced code blocks (lines starting with ``idgbr`` or ``.venv/bin/idgbr``, also after
``&&``; ``\\``-continued lines joined; trailing ``# comments`` stripped) and from inline code spans that start with
``idgbr``. Synopsis spans with placeholders for alternatives or elisions (``[...]``, ``a|b``, ``...``) are skipped.
Block lines must be complete commands; inline spans may be fragments (``idgbr refine``, ``idgbr train --label-embed
PATH``), so for them required arguments are waived, but the sub-command, every option, its type and choices must be
right. Number placeholders (``K``, ``N``, ``PX``) become 3 and the shell's ``"$@"`` is dropped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from idgbr.commands.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "fixtures" / "coarse" / "README.md"]
PREFIX = re.compile(r"^(?:\$\s+)?(?:\S*/)?idgbr\s")  # idgbr ..., .venv/bin/idgbr ..., $ idgbr ...
SYNOPSIS = ("[", "|", "...", "…")


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).rstrip()


def block_commands(text: str) -> list[str]:
    """Command lines inside fenced code blocks, continuation lines joined."""
    commands, in_block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + _strip_comment(raw).strip() if pending else _strip_comment(raw).strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        for part in line.split("&&"):
            part = part.strip()
            if PREFIX.match(part):
                commands.append(part)
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline code spans (outside fenced blocks) that start with idgbr, whitespace normalised."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    return [span for span in spans if PREFIX.match(span) and not any(mark in span for mark in SYNOPSIS)]


NUMBER_PLACEHOLDERS = {"K", "N", "PX"}


def to_argv(command: str) -> list[str]:
    """The arguments after ``idgbr`` (placeholders for numbers made numeric, ``"$@"`` dropped)."""
    words = shlex.split(command)
    words = words[1:] if words[0] == "$" else words
    return ["3" if w in NUMBER_PLACEHOLDERS else w for w in words[1:] if w != "$@"]


def _waive_required(parser) -> None:
    """Make every argument of every sub-command optional (for fragments); unknown options still fail."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for arg in sub._actions:
                    if arg.option_strings:
                        arg.required = False
                    elif arg.nargs is None:
                        arg.nargs = "?"


def check_parses(command: str, fragment: bool = False) -> None:
    """Parse ``command`` with idgbr's parser; an argparse rejection (SystemExit) becomes an AssertionError."""
    parser = build_parser()
    if fragment:
        _waive_required(parser)
    try:
        args = parser.parse_args(to_argv(command))
    except SystemExit as exc:
        raise AssertionError(f"does not parse: {command}") from exc
    assert getattr(args, "func", None) is not None, f"no sub-command: {command}"
    if args.command == "prepare" and not fragment:  # OUT as a positional or as --out, exactly once
        from idgbr.commands.prepare import output_folder

        output_folder(args)


def _collect() -> list[tuple[str, str, bool]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        found += [(path.name, command, False) for command in block_commands(text)]
        found += [(path.name, command, True) for command in inline_commands(text)]
    return found


COMMANDS = _collect()


def test_docs_have_commands():
    names = {name for name, _, _ in COMMANDS}
    assert "README.md" in names and "ablations.md" in names
    assert any("prepare dubai" in command and "--out" in command for _, command, _ in COMMANDS)
    assert any(command.startswith(".venv/bin/idgbr demo") for _, command, _ in COMMANDS)


@pytest.mark.parametrize("doc,command,fragment", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c, _ in COMMANDS])
def test_documented_command_parses(doc, command, fragment, capsys):
    check_parses(command, fragment)


@pytest.mark.parametrize("command", [
    "idgbr prepare dubai RAW --outt X",
    "idgbr predict-coarse --data D --folds three",
    "idgbr coarse predict --data D",
    "idgbr prepare dubai RAW OUT --scale half",
])
@pytest.mark.parametrize("fragment", [False, True])
def test_bad_lines_are_rejected(command, fragment, capsys):
    with pytest.raises(AssertionError, match="does not parse"):
        check_parses(command, fragment)


def test_complete_lines_need_required_arguments(capsys):
    check_parses("idgbr train", fragment=True)
    with pytest.raises(AssertionError, match="does not parse"):
        check_parses("idgbr train")


def test_prepare_out_twice_or_never_is_rejected():
    from idgbr.errors import IdgbrError

    with pytest.raises(IdgbrError, match="not both"):
        check_parses("idgbr prepare dubai RAW OUT --out OUT2")
    with pytest.raises(IdgbrError, match="no output folder"):
        check_parses("idgbr prepare dubai RAW")


def test_extraction_joins_continuations_and_strips_comments():
    text = ("```bash\n"
            "bash x.sh && .venv/bin/idgbr demo --out o   # the demo\n"
            "idgbr train --preset lite \\\n    --data D \\   # where\n    --out R\n"
            "echo idgbr not-a-command\n"
            "```\n"
            "Run `idgbr evaluate --data D\n--pred P` or `idgbr demo [--quick]`.\n")
    assert block_commands(text) == [".venv/bin/idgbr demo --out o", "idgbr train --preset lite --data D --out R"]
    assert inline_commands(text) == ["idgbr evaluate --data D --pred P"]
