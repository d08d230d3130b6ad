"""Every ``idgbr ...`` command line in README.md, docs/*.md and the Markdown files the README links (the results
index and pages, the model cards, datasets/README.md) parses with the real command-line parser; every ``python ...``
line names a script that exists (or, with ``-m idgbr``, parses too); the README's Python example runs.

Command lines are taken from fenced code blocks (lines starting with ``idgbr`` or ``.venv/bin/idgbr``, also after
``&&``; ``\\``-continued lines joined; trailing ``# comments`` stripped) and from inline code spans that start with
``idgbr``. Synopsis spans with placeholders for alternatives or elisions (``[...]``, ``a|b``, ``...``) are skipped.
Block lines must be complete commands; inline spans may be fragments (``idgbr refine``, ``idgbr train --label-embed
PATH``), so for them required arguments are waived, but the sub-command, every option, its type and choices must be
right. Number placeholders (``K``, ``N``, ``PX``) become 3 and the shell's ``"$@"`` is dropped.

Sub-commands that replaced scripts (``ablate``, ``build-models``, ``gpu-check``) are checked like every other.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from idgbr.commands.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
BASE_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "fixtures" / "coarse" / "README.md"]


def linked_docs(path: Path) -> list[Path]:
    """The repository's Markdown files that ``path`` links to (relative links; a folder link means its README.md)."""
    found = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        linked = (path.parent / target).resolve()
        linked = linked / "README.md" if linked.is_dir() else linked
        if linked.suffix == ".md" and linked.is_file() and ROOT in linked.parents:
            found.append(linked)
    return found


DOCS = list(dict.fromkeys([*BASE_DOCS, *linked_docs(ROOT / "README.md")]))
PREFIX = re.compile(r"^(?:\$\s+)?(?:\S*/)?idgbr\s")  # idgbr ..., .venv/bin/idgbr ..., $ idgbr ...
PYTHON = re.compile(r"^(?:\$\s+)?(?:\S*/)?python3?\s")  # python ..., .venv/bin/python ...
REPO_FOLDERS = {"scripts", "src", "tests", ".ci"}
NEW_SUBCOMMANDS = {"ablate", "build-models", "gpu-check"}  # once scripts, now sub-commands
SYNOPSIS = ("[", "|", "...", "…")


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).rstrip()


def block_commands(text: str, python: bool = False) -> list[str]:
    """Command lines inside fenced code blocks, continuation lines joined (``python``: ``python ...`` lines too)."""
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
            if PREFIX.match(part) or (python and PYTHON.match(part)):
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


def check_python(command: str) -> None:
    """A ``python`` line: ``-m idgbr ...`` parses like ``idgbr ...``; ``-m MODULE`` is importable; a script under one
    of the repository's folders exists."""
    import importlib.util

    words = [w for w in shlex.split(command) if w != "$"][1:]
    while words and words[0].startswith("-") and words[0] != "-m":  # interpreter options (-u, -X ...)
        words.pop(0)
    assert words, f"no script or module: {command}"
    if words[0] == "-m":
        if words[1] == "idgbr":
            return check_parses("idgbr " + shlex.join(words[2:]))
        assert importlib.util.find_spec(words[1]) is not None, f"no module {words[1]}: {command}"
        return None
    script = words[0]
    assert script.endswith(".py"), f"not a script: {command}"
    if script.split("/")[0] in REPO_FOLDERS:  # else a file the document has the user write (docs/archive.md)
        assert (ROOT / script).is_file(), f"no script {script}: {command}"


def registered_subcommands() -> set[str]:
    import argparse

    parser = build_parser()
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def _label(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _collect() -> list[tuple[str, str, bool]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        found += [(_label(path), command, False) for command in block_commands(text, python=True)]
        found += [(_label(path), command, True) for command in inline_commands(text)]
    return found


def _params(found: list[tuple[str, str, bool]]) -> list:
    return [pytest.param(doc, command, fragment, id=f"{doc}:{command[:60]}") for doc, command, fragment in found]


COMMANDS = _collect()


def test_docs_have_commands():
    names = {name for name, _, _ in COMMANDS}
    assert "README.md" in names and "docs/ablations.md" in names
    assert any("prepare dubai" in command and "--out" in command for _, command, _ in COMMANDS)
    assert any(command.startswith(".venv/bin/idgbr demo") for _, command, _ in COMMANDS)


@pytest.mark.parametrize("doc,command,fragment", _params(COMMANDS))
def test_documented_command_parses(doc, command, fragment, capsys):
    if PYTHON.match(command):
        check_python(command)
    else:
        check_parses(command, fragment)


def test_readme_links_are_covered():
    """The Markdown files the README links are scanned, and every relative link in it points at a file."""
    labels = {_label(path) for path in DOCS}
    for expected in ("docs/results/README.md", "docs/results/quickstart.md", "docs/results/strong_maps.md",
                     "src/idgbr/models/dubai-coarse/README.md", "src/idgbr/models/dubai-lite/README.md"):
        assert expected in labels
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        assert "://" in target or (ROOT / target).exists(), f"README links a missing file: {target}"
    anchors = re.findall(r"\]\(#([^)]+)\)", readme)
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.S | re.M)
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    assert "installing-on-a-gpu-machine" in headings  # pyproject.toml links it
    assert set(anchors) <= headings, set(anchors) - headings


def test_readme_commands_are_the_quick_start_and_ci():
    """The README's two quick-start lines, and CI runs exactly the second."""
    text = (ROOT / "README.md").read_text()
    commands = block_commands(text)
    assert "bash scripts/setup.sh && .venv/bin/idgbr demo --out out/demo" in text
    test_line = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert test_line in text and test_line in (ROOT / ".ci" / "run").read_text()
    bare = [c for c in commands if c.startswith("idgbr ")]
    assert not bare, f"setup puts no idgbr on PATH; call .venv/bin/idgbr: {bare}"


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, on the files the quick start's demo writes for tile7_part01 (made here the way
    ``idgbr demo`` makes them: the Dubai set prepared at half resolution, the shipped coarse model's test map), with
    the shipped refiner."""
    import os

    from idgbr.training.coarse import predict_coarse
    from idgbr.evaluation.demo import REPO_DUBAI, DemoSettings
    from idgbr.data.prepare import prepare

    blocks = readme_python_blocks()
    assert blocks and all("out/demo/" in block for block in blocks if "read_image" in block)
    raw = tmp_path / "raw"
    for sub, suffix in (("images", ".jpg"), ("masks", ".png")):
        (raw / sub).mkdir(parents=True)
        os.symlink(REPO_DUBAI / sub / f"tile7_part01{suffix}", raw / sub / f"tile7_part01{suffix}")
    data = tmp_path / "out" / "demo" / "data" / "dubai"  # where run_demo puts it
    prepare("dubai", raw, data, overwrite=True, scale=DemoSettings().scale)
    predict_coarse("dubai-coarse", data, "test", "dubai-coarse", device="cpu")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    from idgbr.io import read_label

    refined, _ = read_label(tmp_path / "out" / "tile7_part01_refined.png")
    coarse, _ = read_label(data / "coarse" / "dubai-coarse" / "tile7_part01.png")
    assert refined.shape == coarse.shape and refined.max() < 6


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


def test_former_scripts_are_subcommands():
    assert NEW_SUBCOMMANDS <= registered_subcommands()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=_label)
def test_doc_python_blocks_compile_and_name_real_things(path):
    """Every Python block in the README and the docs is valid Python, its ``idgbr`` imports resolve, and the model
    methods that docs/design.md's API sketch calls exist (the README's example also runs, above; docs/archive.md's
    cluster recipes need packages that are not installed, so only their syntax is checked)."""
    import importlib

    from idgbr.nn.model import IDGBRModel

    for block in python_blocks(path):
        compile(block, str(path), "exec")
        for module, names in re.findall(r"^from (idgbr[\w.]*) import ([\w, ]+)$", block, flags=re.M):
            imported = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(imported, name), f"{_label(path)}: {module} has no {name}"
        for method in re.findall(r"\bmodel\.(\w+)\(", block):
            assert hasattr(IDGBRModel, method), f"{_label(path)}: IDGBRModel has no {method}()"
        for method in re.findall(r"\brefiner\.(\w+)\(", block):
            from idgbr import Refiner

            assert hasattr(Refiner, method), f"{_label(path)}: Refiner has no {method}()"
