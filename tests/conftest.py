"""Shared pytest set-up: the `--update-golden` option, a `golden` fixture, GPU-test skipping, and
a private kernel cache for the whole session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden files under tests/golden/ with the current output")


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_cache(tmp_path_factory):
    """Generated kernels go to a fresh cache directory, never to the user's ~/.cache/attnc."""
    old = os.environ.get("ATTNC_CACHE_DIR")
    os.environ["ATTNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("attnc-cache"))
    yield
    if old is None:
        os.environ.pop("ATTNC_CACHE_DIR", None)
    else:
        os.environ["ATTNC_CACHE_DIR"] = old


@pytest.fixture
def forward_grids(monkeypatch):
    """[(kernel name, grid)] of every forward launch of the test (no prepared launch reused)."""
    from attnc.runtime import dispatch
    seen = []
    run = dispatch.run_launch

    def counted(compiled, launch):
        seen.append((launch.name, launch.grid))
        return run(compiled, launch)
    monkeypatch.setattr(dispatch, "run_launch", counted)
    monkeypatch.setattr(dispatch, "_TEMPLATES", type(dispatch._TEMPLATES)())
    return seen


@pytest.fixture
def kernel_cache_dir(tmp_path, monkeypatch):
    """A fresh kernel cache directory for one test, and no module loaded from memory."""
    from attnc.runtime import jit
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    jit.clear_memory_cache()
    yield tmp_path
    jit.clear_memory_cache()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped cleanly on machines without CUDA."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Golden:
    """Compares text with a checked-in file; `pytest --update-golden` rewrites the file instead."""

    def __init__(self, update: bool):
        self.update = update

    def check(self, path: Path, actual: str):
        actual = actual if actual.endswith("\n") else actual + "\n"
        if self.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text(encoding="utf-8") != actual:
                path.write_text(actual, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"golden file {path} is missing; run pytest with --update-golden to create it")
        expected = path.read_text(encoding="utf-8")
        assert actual == expected, (f"output differs from {path.relative_to(GOLDEN_DIR.parent)} "
                                    "(run pytest --update-golden to accept the new output)")


@pytest.fixture
def golden(request) -> Golden:
    return Golden(request.config.getoption("--update-golden"))
