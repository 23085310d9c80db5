"""Logging for long-running services: repeated records are summarised, not repeated.

A service facing clients it does not control (the view, the Foxglove bridge) must not let them fill its
stderr: one bogus request per millisecond would otherwise log a traceback per millisecond.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["RepeatSummary", "configure_service_logging"]


class RepeatSummary(logging.Filter):
    """Lets the first ``burst`` records of each kind (logger, level, message template) through per
    ``period_s``; the rest are counted, and the next record of that kind after the period says how many
    were left out. Tracebacks are kept for the first record of a kind only."""

    def __init__(self, *, burst: int = 3, period_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.period_s, self.clock = burst, period_s, clock
        self._kinds: dict[tuple[str, int, str], list] = {}  # kind -> [window start, passed, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg)[:200])
        now = self.clock()
        window = self._kinds.get(kind)
        if window is None or now - window[0] >= self.period_s:
            suppressed = window[2] if window else 0
            first = window is None
            window = self._kinds[kind] = [now, 0, 0]
            if len(self._kinds) > 1000:  # bounded: a flood of distinct messages forgets the oldest kinds
                self._kinds.pop(next(iter(self._kinds)))
            if suppressed:
                record.msg = f"{record.msg} ({suppressed} more like this in the last {self.period_s:g} s not shown)"
            if not first:
                record.exc_info, record.exc_text = None, None
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        if window[1] > 1:
            record.exc_info, record.exc_text = None, None
        return True


def configure_service_logging(level: int = logging.WARNING) -> logging.Handler:
    """One stderr handler on the root logger, with :class:`RepeatSummary`; returns it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    handler.addFilter(RepeatSummary())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
