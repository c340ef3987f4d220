"""What the command lines share: `attnc` (attnc/cli.py) and `attnc fuzz` (runtime/fuzz/driver.py).

- `Exit`: the exit codes, one table (the README's "Command line" section lists `EXIT_MEANING`);
- `read_spec`: the text of a FILE argument, a path or a standard pattern `std.NAME`;
- `for_command_line`: a SpecError whose hints speak the Python API (`prefix=...`, `name=...`,
  `backend='reference'`) rewritten to speak the command line (`--set prefix=...`, `--name P`,
  `--backend reference`).
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from enum import IntEnum

from ..dsl.diagnostics import SpecError
from ..dsl.loader import stdlib_source


class Exit(IntEnum):
    """Exit codes of every `attnc` command (and of `python -m attnc.runtime.fuzz`)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    INTERNAL = 3
    INTERRUPTED = 130


#: what each exit code means, as the README's table says it
EXIT_MEANING = {
    Exit.OK: "success",
    Exit.ERROR: "an error in a spec, its arguments or a file; `run`: non-finite output; "
                "`fuzz`: a property failed (reproducer saved)",
    Exit.USAGE: "a command-line usage error, or something the command needs is missing "
                "(hypothesis for `fuzz`, matplotlib for `--png`, CUDA for `--device cuda`, Triton's "
                "interpreter)",
    Exit.INTERNAL: "an internal error (a bug in attnc; please report it)",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
}


def is_std(file: str) -> bool:
    """Whether a FILE argument names a standard pattern (`std.NAME`, and no such file exists)."""
    return file.startswith("std.") and not os.path.exists(file)


def read_spec(file: str) -> tuple[str, str]:
    """(text, path) of a FILE argument: a `.attn` file, or `std.NAME` for the standard library
    (path `<std>/NAME.attn`, as `attnc.std` names it). An unknown standard name is a SpecError
    with the nearest name; an unreadable file raises OSError."""
    if not is_std(file):
        with open(file, encoding="utf-8") as f:
            return f.read(), file
    stem = file[len("std."):]
    return stdlib_source(stem, "std."), f"<std>/{stem}.attn"


#: (Python-API wording, command-line wording) in hints and messages
_CLI_WORDING = (
    (re.compile(r"pass it as a keyword: `(\w+)=\.\.\.`"), r"give it on the command line: `--set \1=...`"),
    (re.compile(r"e\.g\. `(\w+)=\.\.\.`"), r"e.g. `--set \1=...`"),
    (re.compile(r"choose one with name=\.\.\."), "choose one with `--name P`"),
    (re.compile(r"backend='(\w+)'"), r"`--backend \1`"),
)


def cli_wording(text: str | None) -> str | None:
    """`text` with the Python API's spelling of arguments replaced by the command line's."""
    if text is None:
        return None
    for pattern, repl in _CLI_WORDING:
        text = pattern.sub(repl, text)
    return text


def for_command_line(error: SpecError) -> SpecError:
    """The same error, its messages and hints in the command line's words."""
    return SpecError([replace(d, message=cli_wording(d.message), hint=cli_wording(d.hint))
                      for d in error.diagnostics])
