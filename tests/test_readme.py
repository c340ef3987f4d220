"""The README's promises that are not commands: its pattern examples compile, its mapping from
FlexAttention names what it maps, its set-up says how long the tests take and where a CPU torch
comes from. (The two set-up commands are checked in test_cli.py.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import attnc

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _attn_blocks():
    blocks = re.findall(r"^```\n(.*?)^```", README, flags=re.M | re.S)
    return [b for b in blocks if re.search(r"^pattern ", b, flags=re.M)]


@pytest.mark.parametrize("block", _attn_blocks())
def test_every_pattern_block_compiles(block):
    names = re.findall(r"^pattern\s+(\w+)", block, flags=re.M)
    for name in names:
        p = attnc.compile(block, name=name, path="README.md")
        assert p.name == name


def test_the_pattern_blocks_were_found():
    assert len(_attn_blocks()) >= 4


def test_coming_from_flex_attention_maps_its_api():
    section = README.split("### Coming from FlexAttention", 1)[1].split("\n## ", 1)[0]
    for name in ("score_mod", "mask_mod", "BlockMask", "kernel_options", "return_lse", "enable_gqa",
                 "is_causal"):
        assert f"`{name}" in section, name
    assert "kernel_options_for" in section and hasattr(attnc, "kernel_options_for") or \
        "kernel_options_for" not in section


def test_set_up_says_how_long_the_tests_take_and_where_cpu_torch_comes_from():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"about \d+ minutes on 2 CPU cores", setup)
    assert "https://download.pytorch.org/whl/cpu" in setup and "torch==2.13.0" in setup
