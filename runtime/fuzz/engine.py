"""Hypothesis over fuzz cases: run the properties on drawn cases and shrink a failure."""
from __future__ import annotations

import time

from hypothesis import HealthCheck, Phase, given, reject, settings, seed as hseed
from hypothesis.errors import Unsatisfiable

from .outcomes import PROPERTIES, PropertyFailure, Rejected, Stats
from .properties import check_case

def hypothesis_settings(max_examples: int, derandomize: bool = False) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                    report_multiple_bugs=False, print_blob=False,
                    suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))


def search(strategy, properties=PROPERTIES, backend: str = "triton", max_examples: int = 100,
           seed: int = 0, stats: Stats | None = None, deadline: float | None = None):
    """Run hypothesis on `strategy`; return (minimal failing case, PropertyFailure) or None.
    Past `deadline` (a time.monotonic() value) new cases are skipped unchecked, unless a failure
    is being shrunk, so a budget overruns by at most one case."""
    stats = stats if stats is not None else Stats()
    failures: list = []

    @hseed(seed)
    @hypothesis_settings(max_examples)
    @given(strategy)
    def run(case):
        if deadline is not None and not failures and time.monotonic() > deadline:
            reject()
        try:
            check_case(case, properties, backend, stats)
        except Rejected:
            reject()
        except PropertyFailure as e:
            failures.append((case, e))
            raise

    try:
        run()
    except PropertyFailure:
        return failures[-1]
    except Unsatisfiable:
        return None
    return None
