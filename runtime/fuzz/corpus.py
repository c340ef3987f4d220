"""Reproducer files: a failing case saved as `NAME.attn` + `NAME.json` (the format of
tests/corpus/), loaded and replayed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...dsl.diagnostics import SpecError
from ...dsl.parser import parse
from .case import Case, compiled_pattern, inputs
from .outcomes import PROPERTIES, PropertyFailure, Rejected
from .properties import check_case

def save_reproducer(case: Case, failure: PropertyFailure, directory) -> tuple[Path, Path]:
    """Write NAME.attn and NAME.json under `directory`; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pattern = compiled_pattern(case.source, case.name)
    inputs(case, pattern)  # materialize the tensor arguments, so the sidecar is self-contained
    digest = hashlib.sha256((case.source + json.dumps(case.to_json(), sort_keys=True)).encode()).hexdigest()[:10]
    stem = f"{failure.prop}-{digest}"
    attn, sidecar = directory / f"{stem}.attn", directory / f"{stem}.json"
    attn.write_text(case.source, encoding="utf-8")
    meta = case.to_json()
    meta["found"] = failure.message.splitlines()[0]
    sidecar.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return attn, sidecar


def load_reproducer(sidecar) -> tuple[Case, dict]:
    """The case saved by `save_reproducer` (the `.attn` file next to the `.json`), and its metadata."""
    sidecar = Path(sidecar)
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    source = sidecar.with_suffix(".attn").read_text(encoding="utf-8")
    return Case.from_json(source, meta), meta


def replay(sidecar, backend: str = "triton", properties=PROPERTIES) -> None:
    """Run every property on a saved case; raises PropertyFailure if one fails."""
    case, _ = load_reproducer(sidecar)
    try:
        module = parse(case.source, str(sidecar))
        if case.name == "fuzzed":
            case.module = module  # a generated pattern: it must compile
    except SpecError:
        pass
    try:
        check_case(case, properties, backend)
    except Rejected:
        pass
