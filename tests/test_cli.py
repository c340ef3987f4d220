"""The `attnc` command line, the examples, and the README's commands."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnc
from attnc.cli import main, parse_value
from attnc.runtime.maskview import render_mask
from attnc.runtime.samples import random_tensor_arguments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
BAD = Path(__file__).parent / "golden" / "diagnostics"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- examples

def test_there_are_examples():
    names = {p.stem for p in EXAMPLES}
    assert {"streaming", "causal_window", "sharp_topk", "sigmoid", "packed_documents"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_checks(path, capsys):
    code, out, err = run_cli(capsys, "check", path)
    assert code == 0, err
    assert out.startswith(f"{path}: ok")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_reference(path, capsys):
    code, out, err = run_cli(capsys, "run", path, "--backend", "reference", "--q-len", 64, "--heads", 2,
                             "--head-dim", 16, "--device", "cpu")
    assert code == 0, err
    assert "backend   reference" in out
    assert "NaN/inf   none" in out
    assert re.search(r"time\s+[\d.]+ ms", out)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_shows(path, capsys):
    code, out, err = run_cli(capsys, "show", path, "--q-len", 64)
    assert code == 0, err
    assert "positions allowed" in out


def test_quickstart_script():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "std causal matches SDPA: True" in res.stdout


# ----------------------------------------------------------------------------- check

def test_check_reports_errors_and_exit_code(capsys):
    good = EXAMPLES[0]
    code, out, err = run_cli(capsys, "check", good, BAD / "unknown_name.attn")
    assert code == 1
    assert f"{good}: ok" in out
    assert "unknown_name.attn:2:15: error: unknown name `kk`" in err
    assert "^~" in err and "did you mean `k`?" in err


def test_check_a_directory(capsys):
    code, out, err = run_cli(capsys, "check", ROOT / "examples")
    assert code == 0, err
    assert out.count(": ok") == len(EXAMPLES)


def test_check_missing_file(capsys):
    code, out, err = run_cli(capsys, "check", "no/such/file.attn")
    assert code == 1
    assert "no/such/file.attn" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- show

def test_show_causal_picture(capsys):
    code, out, err = run_cli(capsys, "show", "std.causal", "--q-len", 4)
    assert code == 0, err
    rows = [line.split()[-1] for line in out.splitlines() if re.match(r"^\s*\d+\s+[#.]+$", line)]
    assert rows == ["#...", "##..", "###.", "####"]


def test_show_with_settings_and_lengths(capsys):
    code, out, err = run_cli(capsys, "show", ROOT / "examples" / "streaming.attn", "--set", "window=2",
                             "--set", "sinks=1", "--q-len", 6, "--k-len", 8)
    assert code == 0, err
    rows = [line.split()[-1] for line in out.splitlines() if re.match(r"^\s*\d+\s+[#.]+$", line)]
    assert rows == ["#.......", "##......", "###.....", "#.##....", "#..##...", "#...##.."]


def test_show_large_sizes_are_summarized(capsys):
    code, out, err = run_cli(capsys, "show", "std.causal", "--q-len", 1000, "--width", 50, "--height", 20)
    assert code == 0, err
    picture = [line for line in out.splitlines() if re.match(r"^\s*\d+\s+[#.+]+$", line)]
    assert len(picture) == 20 and all(len(line.split()[-1]) == 50 for line in picture)
    assert "+" in out


def test_show_layout_or_clear_message(capsys):
    code, out, err = run_cli(capsys, "show", "std.causal", "--layout", "--q-len", 256, "--block", "64,64")
    if hasattr(attnc.Pattern, "layout"):
        assert code == 0, err
    else:
        assert code == 1 and "not available" in err


def test_show_unknown_pattern_name(capsys):
    code, out, err = run_cli(capsys, "show", ROOT / "examples" / "streaming.attn", "--name", "streamng")
    assert code == 1
    assert "did you mean `streaming`?" in err


# ----------------------------------------------------------------------------- run

def test_run_reports_what_ran(capsys):
    code, out, err = run_cli(capsys, "run", ROOT / "examples" / "streaming.attn", "--set", "window=8",
                             "--batch", 2, "--heads", 4, "--kv-heads", 2, "--q-len", 40, "--k-len", 48,
                             "--head-dim", 8, "--dtype", "bf16", "--backend", "reference", "--repeat", 2)
    assert code == 0, err
    assert "streaming" in out and "window=8, sinks=4" in out
    assert "q [2, 4, 40, 8]  k, v [2, 2, 48, 8]  dtype bf16  device cpu" in out
    assert "median of 1 more" in out
    assert re.search(r"mean [-+]?[\d.e+-]+\s+std [\d.e+-]+\s+abs max [\d.e+-]+", out)


def test_run_counts_fully_masked_rows(capsys, tmp_path):
    # `mask q >= k + 8`: queries 0..7 see nothing
    path = tmp_path / "shift.attn"
    path.write_text("pattern shift:\n    mask q >= k + 8\n")
    code, out, err = run_cli(capsys, "run", path, "--q-len", 16, "--heads", 1, "--backend", "reference")
    assert code == 0, err
    assert "rows      8 of 16 fully masked (50.00%)" in out
    path.write_text("pattern shift:\n    mask q >= k + 8\n    normalize sigmoid(bias = -1.0)\n")
    code, out, err = run_cli(capsys, "run", path, "--q-len", 16, "--heads", 1, "--backend", "reference")
    assert code == 0, err
    assert "rows      8 of 16 fully masked (50.00%)" in out


@pytest.mark.parametrize("argv, code, needle", [
    (["run", "EX/streaming.attn", "--set", "window=2.5"], 1, "parameter `window` of `streaming` is int"),
    (["run", "EX/streaming.attn", "--set", "windw=3"], 1, "did you mean `window`?"),
    (["run", "EX/streaming.attn", "--set", "window"], 2, "--set expects key=value"),
    (["run", "EX/streaming.attn", "--set", "window=abc"], 2, "cannot read `abc`"),
    (["run", "EX/packed_documents.attn", "--set", "doc=1"], 2, "tensor argument"),
    (["run", "EX/streaming.attn", "--heads", "3", "--kv-heads", "2"], 2, "multiple of --kv-heads"),
    (["run", "EX/packed_documents.attn", "--q-len", "8", "--k-len", "16", "--backend", "reference"], 1,
     "out of range for dimension 1 of tensor `doc`"),
    (["run", "EX/sharp_topk.attn", "--set", "top=0", "--q-len", "8"], 1, "at least one key"),
    (["run", "EX/missing.attn"], 1, "No such file"),
    (["run", "std.nonexistent"], 1, "no standard pattern"),
    (["frobnicate"], 2, "invalid choice"),
    (["run"], 2, "required"),
])
def test_user_errors_have_exit_codes_and_no_traceback(argv, code, needle, capsys):
    argv = [a.replace("EX/", str(ROOT / "examples") + "/") for a in argv]
    try:
        got = main(argv)
    except SystemExit as e:  # argparse usage errors
        got = e.code
    out, err = capsys.readouterr()
    assert got == code, err
    assert needle in err
    assert "Traceback" not in err


def test_run_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = run_cli(capsys, "run", "std.causal", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_emit_or_clear_message(capsys):
    code, out, err = run_cli(capsys, "emit", "std.causal")
    if hasattr(attnc.Pattern, "triton_source"):
        assert code == 0, err
        assert "triton" in out
    else:
        assert code == 1 and "not available" in err


def test_console_entry_points():
    """`python -m attnc` works in a fresh process, and a spec error exits 1 without a traceback."""
    env = {**os.environ, "ATTNC_DEBUG": "0"}
    res = subprocess.run([sys.executable, "-m", "attnc", "check", str(ROOT / "examples" / "streaming.attn")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "attnc", "check", str(BAD / "mask_not_bool.attn")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1
    assert "a mask must be a boolean" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("text, value", [("3", 3), ("-2", -2), ("2.5", 2.5), ("1e-3", 1e-3),
                                         ("true", True), ("False", False)])
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_random_tensor_arguments_are_plausible():
    p = attnc.compile("pattern d:\n    tensor doc: int[batch, q_len]\n    tensor g: bool[k_len]\n"
                      "    tensor s: float[heads, 3]\n    mask doc[b, q] == doc[b, k] or g[k]\n"
                      "    score -= s[h, 0]\n")
    sizes = dict(batch=2, heads=4, kv_heads=4, q_len=64, k_len=64, head_dim=8)
    args = random_tensor_arguments(p.ir, sizes, {}, generator=torch.Generator().manual_seed(1))
    doc, g, s = args["doc"], args["g"], args["s"]
    assert doc.shape == (2, 64) and doc.dtype == torch.int64
    assert bool((doc[:, 0] == 0).all()) and bool((doc.diff(dim=-1) >= 0).all()) and int(doc.max()) >= 1
    assert g.shape == (64,) and g.dtype == torch.bool
    assert s.shape == (4, 3) and s.dtype == torch.float32 and float(s.min()) >= 0.1


def test_render_mask_small():
    text = render_mask(torch.tensor([[True, False], [True, True]]))
    assert text.splitlines()[-2:] == ["0  #.", "1  ##"]


# ----------------------------------------------------------------------------- README and CI

def _readme_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^(pip install torch==\S+ .*)$", text, flags=re.M)


def test_readme_has_the_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "attnc run examples/" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1].split("&&", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_fuzz_subcommand_is_wired(capsys):
    from attnc.cli import main
    with pytest.raises(SystemExit) as e:
        main(["fuzz", "--help"])
    assert e.value.code == 0
    assert "attnc fuzz" in capsys.readouterr().out


#: run in a child: every command but `fuzz`, then whether hypothesis (a test extra) was imported
WITHOUT_FUZZ = """
import sys
import attnc
from attnc.cli import main
example = sys.argv[1]
assert main(["check", example]) == 0
assert main(["show", example, "--q-len", "8"]) == 0
assert main(["run", example, "--q-len", "16", "--heads", "1", "--head-dim", "8", "--backend", "reference"]) == 0
assert main(["emit", "std.causal"]) == 0
try:
    main(["--help"])
except SystemExit:
    pass
print("hypothesis imported:", "hypothesis" in sys.modules)
"""


def test_attnc_never_imports_hypothesis():
    """hypothesis is a test extra: `import attnc` and check / show / run / emit / --help work
    without it, and do not import it."""
    example = str(ROOT / "examples" / "streaming.attn")
    r = subprocess.run([sys.executable, "-c", WITHOUT_FUZZ, example], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("hypothesis imported: False"), r.stdout[-2000:]
    r = subprocess.run([sys.executable, "-c", "import sys, attnc; print('hypothesis' in sys.modules)"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_fuzz_without_hypothesis_says_how_to_install_it():
    """`attnc fuzz` where hypothesis is missing: a one-line usage error (exit 2), no traceback."""
    code = ("import sys\nsys.modules['hypothesis'] = None  # as if it were not installed\n"
            "from attnc.cli import main\nsys.exit(main(['fuzz', '--examples', '1']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install 'attnc[test]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
