"""Every console example in README.md runs as written, in order, in one fresh folder, like a reader's terminal.

The convention (also in README.md's "Tests"): a ```console (or ```bash) block is a session; lines starting
with `$ ` are commands, any other line is output that the command must print (compared with whitespace
collapsed, so rich's table padding does not matter; `...` stands for lines left out). A block that cannot run
here is preceded by `<!-- readme-test: skip (REASON: why) -->`, REASON one of SKIP_REASONS; synopses with
placeholders are ```text blocks, which are not run.

The folder holds `recipes` (a link to the repo's, as if standing in the checkout) and, when the public data sets
are present, `../shared/data`. `compress` is this checkout's CLI; HF_HUB_OFFLINE=1, so nothing reaches the
network. Blocks share the folder, so `out/w4` made in Quick start is there for Reports.

A plain `compress ARGS [> FILE]` line (the words split as the shell splits them, `# comment` dropped) runs
in this process through the CLI's own Typer app, in the folder and environment the shell would give it: the
README's 13 commands would otherwise pay torch's import 13 times (about 45 s of the suite on 2 cores). Anything
else the shell would interpret (pipes, `&&`, variables, other programs) runs in bash. The real entry point and its
process-level behaviour (exit codes, signals, imports) are covered by tests/test_cli_scripts.py and
tests/core/test_lean_import.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest

from tests.conftest import REPO, SHARED_DATA

README = REPO / "README.md"
SKIP_REASONS = ("network", "gpu", "slow", "interactive")
SKIP_MARKER = re.compile(r"<!-- readme-test: skip \((?P<reason>[a-z]+): (?P<why>[^)]+)\) -->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[a-z]*)\s*$")
RUNNABLE = ("console", "bash", "sh", "shell")
COMMAND_TIMEOUT_S = 600  # a loaded 2-core CI machine; each command takes seconds on an idle one


@dataclass
class Command:
    line: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Example:
    start: int  # README line of the opening fence (1-based)
    commands: list[Command]
    skip: str | None  # "slow: every trial is ..." or None


def examples(text: str) -> list[Example]:
    """The README's console blocks, in order, with their commands, expected output and skip marker."""
    lines = text.splitlines()
    found, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence or not fence["lang"]:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        if fence["lang"] in RUNNABLE:
            before = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = SKIP_MARKER.fullmatch(before)
            body = [line[len(fence["indent"]):] for line in lines[index + 1:end]]
            found.append(Example(index + 1, _commands(body), f"{marker['reason']}: {marker['why']}" if marker else None))
        index = end + 1
    return found


def _commands(body: list[str]) -> list[Command]:
    commands: list[Command] = []
    for line in body:
        if line.startswith("$ "):
            commands.append(Command(line[2:]))
        elif line.strip() and line.strip() != "..." and commands:
            commands[-1].expected.append(line.strip())
    return commands


def _collapsed(text: str) -> str:
    return " ".join(re.sub(r"[│┃┏┓┗┛━─┡┩╇╋┳┻]", " ", text).split())


ALL = examples(README.read_text(encoding="utf-8"))
RUN = [example for example in ALL if example.skip is None]


def test_every_console_block_runs_or_says_why_not():
    """A skip marker with an unknown reason, or a block that is neither run nor marked, is caught here."""
    text = README.read_text(encoding="utf-8")
    for match in re.finditer(r"^\s*<!-- readme-test:.*$", text, re.M):  # on a line of its own (prose may quote one)
        marker = SKIP_MARKER.fullmatch(match[0].strip())
        assert marker and marker["reason"] in SKIP_REASONS, f"{match[0]!r}: the reason must be one of {SKIP_REASONS}"
    assert all(example.commands for example in ALL), [e.start for e in ALL if not e.commands]
    assert len(RUN) >= 4 and sum(len(e.commands) for e in RUN) >= 12, "most of the README's examples must run"


def test_plain_compress_lines_run_in_process_and_the_rest_in_bash():
    assert plain_compress_command("compress recipes show demo > my.yaml   # a copy") == (
        ["recipes", "show", "demo"], "my.yaml")
    assert plain_compress_command("compress run demo --set passes[0].rtn.bits=3 --output out/w3") == (
        ["run", "demo", "--set", "passes[0].rtn.bits=3", "--output", "out/w3"], None)
    for line in ("make demo", "compress run x.yaml && ls out", "compress run $RECIPE", "compress eval a | jq ."):
        assert plain_compress_command(line) == (None, None), line


def test_block_parser_reads_commands_output_and_markers():
    text = ("x\n<!-- readme-test: skip (slow: takes an hour) -->\n```console\n$ a --b\n```\n\n  ```bash\n"
            "  $ c\n  valid: yes\n  ...\n  $ d\n  ```\n```text\n$ not run\n```\n")
    parsed = examples(text)
    assert [(e.start, e.skip) for e in parsed] == [(3, "slow: takes an hour"), (7, None)]
    assert [(c.line, c.expected) for c in parsed[1].commands] == [("c", ["valid: yes"]), ("d", [])]


class Session:
    """The reader's terminal: one folder, the examples run in README order, each once."""

    def __init__(self, root: Path) -> None:
        self.cwd = root / "work"
        self.cwd.mkdir()
        (self.cwd / "recipes").symlink_to(REPO / "recipes")
        if SHARED_DATA.is_dir():
            (root / "shared").mkdir()
            (root / "shared" / "data").symlink_to(SHARED_DATA)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "compress"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m compress.cli.main "$@"\n', encoding="utf-8")
        shim.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        self.env.pop("COMPRESS_DATA_DIR", None)
        self.outcome: dict[int, str | None] = {}  # example start line -> None (passed) or what failed

    def run_through(self, example: Example) -> None:
        for earlier in RUN[: RUN.index(example) + 1]:
            if earlier.start not in self.outcome:
                self.outcome[earlier.start] = self._run(earlier)
            failure = self.outcome[earlier.start]
            if failure is not None:
                where = "" if earlier is example else f"an earlier example (README.md:{earlier.start}) failed: "
                pytest.fail(where + failure)

    def _run(self, example: Example) -> str | None:
        if needs_shared_data(example) and not SHARED_DATA.is_dir():
            return None  # skipped by its own test; nothing after it may depend on it
        for command in example.commands:
            returncode, printed = self._execute(command.line)
            if returncode != 0:
                return f"README.md:{example.start} `$ {command.line}` exited {returncode}:\n{printed[-3000:]}"
            missing = [want for want in command.expected if _collapsed(want) not in _collapsed(printed)]
            if missing:
                return f"README.md:{example.start} `$ {command.line}` did not print {missing}:\n{printed[-3000:]}"
        return None


    def _execute(self, line: str) -> tuple[int, str]:
        """(exit code, what it printed): in this process for a plain `compress` line, else in bash."""
        argv, redirect = plain_compress_command(line)
        if argv is None:
            done = subprocess.run(["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            return done.returncode, done.stdout + done.stderr
        from typer.testing import CliRunner

        from compress.cli.main import app

        with self._as_the_shell_would():
            result = CliRunner().invoke(app, argv)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            trace = "".join(traceback.format_exception(result.exception))
            return 1, result.output + trace
        if redirect is not None:
            (self.cwd / redirect).write_text(result.stdout, encoding="utf-8")
            return result.exit_code, result.stderr
        return result.exit_code, result.output

    @contextlib.contextmanager
    def _as_the_shell_would(self) -> Iterator[None]:
        before = Path.cwd()
        os.chdir(self.cwd)
        try:
            with mock.patch.dict(os.environ, self.env, clear=True):
                yield
        finally:
            os.chdir(before)


SHELL_WORDS = re.compile(r"[|&;<>$`(){}*?~]|^\d*>")


def plain_compress_command(line: str) -> tuple[list[str] | None, str | None]:
    """(arguments, stdout file) of a `compress ARGS [> FILE]` line, or (None, None) when the shell must run it."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None, None
    redirect = None
    if len(words) >= 3 and words[-2] == ">":
        words, redirect = words[:-2], words[-1]
    if not words or words[0] != "compress" or any(SHELL_WORDS.search(word) for word in words[1:]):
        return None, None
    return words[1:], redirect


def needs_shared_data(example: Example) -> bool:
    return any("../shared/data" in command.line for command in example.commands)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("readme"))


@pytest.mark.slow
@pytest.mark.parametrize("example", RUN, ids=[f"README.md:{example.start}" for example in RUN])
def test_readme_example_runs_as_written(example: Example, session: Session):
    if needs_shared_data(example) and not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data (present in CI, not in a user's fresh clone)")
    session.run_through(example)
