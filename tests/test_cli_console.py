"""The command line keeps its promises (issue 12, items 9-11), run as a user runs it: `python -m
attnc ...` in a child process, from the repository root. Checks of wording that need no process
of their own call `attnc.cli.main` in this one."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from attnc.runtime.commandline import EXIT_MEANING, Exit

from attnc.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "golden" / "diagnostics" / "unknown_name.attn"


def attnc(*argv, timeout: float = 300, **env):
    return subprocess.run([sys.executable, "-m", "attnc", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False, env={**os.environ, "ATTNC_DEBUG": "0", **env})


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- 9: FILE, hints, exit codes

def test_check_takes_std_names_and_a_bad_spec_exits_1():
    r = attnc("check", "std.causal", "std.gaussian_mixture", BAD)
    assert r.returncode == Exit.ERROR, r.stderr
    assert "std.causal: ok (causal)" in r.stdout
    assert "std.gaussian_mixture: ok (gaussian_mixture_weight, gaussian_mixture)" in r.stdout
    assert "unknown_name.attn:2:15: error: unknown name `kk`" in r.stderr and "Traceback" not in r.stderr


def test_fuzz_takes_std_names_and_a_bad_spec_exits_1_like_every_command(tmp_path):
    r = attnc("fuzz", "std.sliding_window", "--backend", "reference", "--examples", "2", "--seed", "1",
              "--corpus", tmp_path)
    assert r.returncode == Exit.OK, r.stdout + r.stderr
    assert "std.sliding_window (sliding_window)" in r.stdout and "no failures" in r.stdout
    r = attnc("fuzz", BAD, "--backend", "reference", "--examples", "2", "--corpus", tmp_path)
    assert r.returncode == Exit.ERROR, r.stdout + r.stderr
    assert "unknown name `kk`" in r.stderr and "^~" in r.stderr and "Traceback" not in r.stderr


def test_fuzz_suggests_the_nearest_std_name(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fuzz", "std.slidng_window", "--backend", "reference", "--examples", 2,
                           "--corpus", tmp_path)
    assert code == Exit.ERROR and "did you mean `std.sliding_window`?" in err, err


@pytest.mark.parametrize("command", ["show", "run", "emit"])
def test_a_bad_spec_exits_1_in_process_too(command, capsys):
    code, _, err = run_cli(capsys, command, BAD)
    assert code == Exit.ERROR and "unknown name `kk`" in err


def test_hints_speak_the_command_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "std.prefix_lm", "--q-len", 8, "--heads", 1, "--backend", "reference")
    assert code == Exit.ERROR
    assert "needs a value for parameter `prefix`" in err and "`--set prefix=...`" in err, err
    assert "pass it as a keyword" not in err
    code, _, err = run_cli(capsys, "emit", "std.prefix_lm")
    assert code == Exit.ERROR and "e.g. `--set prefix=...`" in err, err
    two = tmp_path / "two.attn"
    two.write_text("pattern a:\n    mask q >= k\n\npattern b:\n    mask q <= k\n")
    code, _, err = run_cli(capsys, "show", two)
    assert code == Exit.ERROR
    assert "defines 2 patterns (a, b); choose one with `--name P`" in err and "name=..." not in err, err
    code, _, err = run_cli(capsys, "run", "std.causal", "--dtype", "fp64", "--backend", "triton",
                             "--device", "cpu", "--q-len", 8, "--heads", 1)
    if code == Exit.ERROR:  # under Triton's interpreter: fp64 is refused, in the command line's words
        assert "use `--backend reference`" in err and "backend='" not in err, err
    else:  # no interpreter: a usage error first
        assert code == Exit.USAGE and "TRITON_INTERPRET=1" in err


def test_emit_reports_an_unknown_setting_like_run(capsys):
    for extra in ((), ("--q-len", 8, "--heads", 1, "--backend", "reference")):
        command = "run" if extra else "emit"
        code, _, err = run_cli(capsys, command, "std.streaming", "--set", "windw=3", *extra)
        assert code == Exit.ERROR, err
        assert re.search(r"<std>/streaming\.attn:\d+:\d+: error: pattern `streaming` has no parameter or "
                         r"tensor `windw`", err), (command, err)
        assert "^~" in err and "did you mean `window`?" in err, (command, err)


def test_readme_lists_the_exit_codes_of_the_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.MULTILINE))
    assert rows == {str(int(c)): m for c, m in EXIT_MEANING.items()}
    assert {int(c) for c in Exit} == {0, 1, 2, 3, 130}


# ----------------------------------------------------------------------------- 10: fuzz keeps its time

def test_fuzz_ends_on_time_and_reports_progress(tmp_path):
    """Cases of up to 2000 x 2000 under Triton's interpreter take far longer than the budget: the
    one in flight is abandoned at the deadline, and progress lines come at most 5 s apart."""
    seconds = 6
    start = time.monotonic()
    r = attnc("fuzz", "std.causal", "--seconds", seconds, "--max-len", 2000, "--seed", 1, "--corpus", tmp_path,
              TRITON_INTERPRET="1", timeout=180)
    wall = time.monotonic() - start
    assert r.returncode == Exit.OK, r.stdout + r.stderr
    stamps = [0.0] + [float(s) for s in re.findall(r"^\[\s*([\d.]+) s\]", r.stdout, flags=re.MULTILINE)]
    assert len(stamps) >= 3, r.stdout
    assert max(b - a for a, b in itertools.pairwise(stamps)) <= 5.5, r.stdout
    assert "abandoned at the deadline" in r.stdout
    took = float(re.search(r"time is up after ([\d.]+) s", r.stdout).group(1))
    assert took <= seconds + 1.5, r.stdout
    assert wall < seconds + 40, f"{wall:.0f} s in all (start-up and exit included)"  # a loaded 2-core box


def test_the_deadline_abandons_a_slow_case_and_a_long_shrink(monkeypatch):
    """In process: a case that would take 30 s ends at the deadline (counted as abandoned), and
    a failure being shrunk past the deadline is returned as found so far."""
    from attnc.runtime import fuzz
    from attnc.runtime.fuzz import engine
    from hypothesis import strategies as st

    monkeypatch.setattr(engine, "check_case", lambda case, *a: time.sleep(30))
    stats = fuzz.Stats()
    start = time.monotonic()
    assert fuzz.search(st.integers(), stats=stats, deadline=start + 1.0) is None
    assert time.monotonic() - start < 3 and stats.abandoned == 1 and stats.out_of_time

    def slow_failure(case, *a):
        time.sleep(0.2)
        if case > 10:
            raise fuzz.PropertyFailure("kernel", f"{case} > 10")
    monkeypatch.setattr(engine, "check_case", slow_failure)
    start = time.monotonic()
    case, failure = fuzz.search(st.integers(0, 10 ** 9), stats=fuzz.Stats(), seed=3, deadline=start + 1.5)
    assert time.monotonic() - start < 3.5
    assert case > 10 and failure.prop == "kernel"


# ----------------------------------------------------------------------------- 11: show, run, help

def test_show_memory_is_bounded_by_the_picture(tmp_path):
    """q_len 16384 took 5.9 GB of dense masks before; now the picture is sampled, in chunks."""
    with open(tmp_path / "out.txt", "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "attnc", "show", "std.document", "--q-len", "16384"],
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    timer = threading.Timer(300, p.kill)
    timer.start()
    _, status, usage = os.wait4(p.pid, 0)  # this child's own peak memory
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    out = (tmp_path / "out.txt").read_text()
    assert p.returncode == 0, out
    assert "of 268435456 positions allowed" in out and "sampled at" in out
    picture = [line for line in out.splitlines() if re.match(r"^\s*\d+\s+[#.+]+$", line)]
    assert len(picture) == 64 and all(len(line.split()[-1]) == 96 for line in picture)
    assert usage.ru_maxrss < 1_500_000, f"peak RSS {usage.ru_maxrss} KB"  # KB on Linux


def test_show_layout_defaults_to_several_tiles_with_a_legend(capsys):
    code, out, err = run_cli(capsys, "show", "std.causal", "--layout", "--block", "32,16")
    assert code == Exit.OK, err
    assert "q_len=256 k_len=128" in out and "(8x8)" in out
    assert "legend: '█' full tile" in out and "'░' partial" in out and "' ' empty" in out
    code, _, err = run_cli(capsys, "show", "std.causal", "--png", "x.png")
    assert code == Exit.USAGE and "--png saves a picture of the block layout: add --layout" in err


def test_run_under_the_interpreter_says_so_and_warns_about_long_shapes():
    """`attnc run --backend triton` on the CPU: the default shapes (8 heads x 1024) take minutes
    under the interpreter; the warning comes before the call, and the run is stopped there."""
    p = subprocess.Popen([sys.executable, "-m", "attnc", "run", "std.causal", "--backend", "triton", "--device",
                          "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    timer = threading.Timer(240, p.kill)
    timer.start()
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("warning"):
                break
    finally:
        p.kill()
        p.wait()
        timer.cancel()
    text = "".join(lines)
    assert "runs under Triton's interpreter" in text, text
    assert re.search(r"warning\s+\d+ tiles of \d+x\d+ per call under the interpreter: expect roughly \d+ s", text), text


def _help_entries(text: str) -> list[tuple[str, str]]:
    """(invocation, help) of every argument in an argparse --help text."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            invocation, _, rest = line.strip().partition("  ")
            current = [invocation, rest.strip()]
            entries.append(current)
        elif current is not None and line.startswith("    "):
            current[1] = (current[1] + " " + line.strip()).strip()
        else:
            current = None
    return [tuple(e) for e in entries]


@pytest.mark.parametrize("command", ["check", "show", "run", "emit", "fuzz", None])
def test_every_option_has_help_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(([command] if command else []) + ["--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert entries
    for invocation, help_text in entries:
        if invocation.startswith(("-h, --help", "{")):
            continue
        assert help_text, f"`{invocation}` of `attnc {command or ''}` has no help"
        if invocation.startswith("-") and invocation != "--version":
            assert "default" in help_text, f"`{invocation}` of `attnc {command or ''}`: {help_text}"
    if command is not None and command != "fuzz":  # every option of the parser is in its help
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
        shown = " ".join(i for i, _ in entries)
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in shown, flag


def test_help_through_the_console():
    r = attnc("show", "--help")
    assert r.returncode == 0 and "(default: 96)" in r.stdout, r.stdout + r.stderr
