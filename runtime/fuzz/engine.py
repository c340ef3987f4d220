"""Hypothesis over fuzz cases: run the properties on drawn cases and shrink a failure, under a
deadline that no case, and no shrinking, can overrun."""
from __future__ import annotations

import signal
import threading
import time

from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import seed as hseed
from hypothesis.errors import Unsatisfiable

from .outcomes import PROPERTIES, PropertyFailure, Rejected, Stats
from .properties import check_case


class OutOfTime(BaseException):
    """The deadline passed while a case ran: raised into the case in flight, which is abandoned.
    A BaseException, so that neither a property's `except Exception` nor hypothesis (which
    treats only Exceptions as test failures) catches it."""


def hypothesis_settings(max_examples: int, derandomize: bool = False) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                    report_multiple_bugs=False, print_blob=False,
                    suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))


class _Alarm:
    """At `deadline` (a time.monotonic() value), raise `OutOfTime` into the case in flight,
    wherever it is then, between two Python bytecodes (SIGALRM). Only inside a case (`in_case`):
    hypothesis's own bookkeeping must not be interrupted; between cases, the next case sees the
    deadline has passed and raises itself. Without a deadline, off the main thread or without
    `signal.setitimer`, nothing is armed and cases are only checked before they start."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        self.in_case = False
        self.armed = deadline is not None and hasattr(signal, "setitimer") and \
            threading.current_thread() is threading.main_thread()

    def _ring(self, signum, frame):
        if self.in_case:
            self.in_case = False
            raise OutOfTime()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._ring)
            signal.setitimer(signal.ITIMER_REAL, max(self.deadline - time.monotonic(), 1e-3))
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def search(strategy, properties=PROPERTIES, backend: str = "triton", max_examples: int = 100,
           seed: int = 0, stats: Stats | None = None, deadline: float | None = None):
    """Run hypothesis on `strategy`; return (minimal failing case, PropertyFailure) or None.

    At `deadline` (a time.monotonic() value) the case in flight is abandoned (`stats.abandoned`)
    and so is the shrinking of a failure: the smallest failing case found so far is returned."""
    stats = stats if stats is not None else Stats()
    failures: list = []
    alarm = _Alarm(deadline)

    @hseed(seed)
    @hypothesis_settings(max_examples)
    @given(strategy)
    def run(case):
        if alarm.expired():
            raise OutOfTime()
        try:
            alarm.in_case = True
            check_case(case, properties, backend, stats)
        except OutOfTime:
            stats.abandoned += 1
            raise
        except Rejected:
            alarm.in_case = False
            reject()
        except PropertyFailure as e:
            alarm.in_case = False
            failures.append((case, e))
            raise
        finally:
            alarm.in_case = False

    try:
        with alarm:
            run()
    except PropertyFailure:
        return failures[-1]
    except Unsatisfiable:
        return None
    except OutOfTime:
        stats.out_of_time = True
        return failures[-1] if failures else None
    return None
