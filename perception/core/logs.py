"""Logging for long-running services: repeated records are summarised, not repeated.

A service facing clients it does not control (the view, the Foxglove bridge) must not let them fill its
stderr: one bogus request per millisecond would otherwise log a traceback per millisecond.
"""

from __future__ import annotations

import logging
import re
import sys
import time

__all__ = ["RepeatSummary", "configure_service_logging"]


# Numbers, dotted addresses, hex and IPv6 groups (with their ports): what differs between records of a kind.
_KIND_NUMBERS = re.compile(r"\[?[0-9a-fA-F:.]*\d[0-9a-fA-F:.]*\]?")


class RepeatSummary(logging.Filter):
    """Lets the first ``burst`` records of each kind (logger, level, message with its numbers, addresses
    and ports blanked out) through per ``period_s``; the rest are counted, and the next record of that kind
    after the period says how many were left out. Tracebacks are kept for the first record of a kind only.
    A flood from many clients is one kind: the Foxglove SDK's "handshake failed" names each client's
    address, and 20,000 half-open connections logged 19,979 lines when the kind was the whole text."""

    def __init__(self, *, burst: int = 3, period_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.period_s, self.clock = burst, period_s, clock
        self._kinds: dict[tuple[str, int, str], list] = {}  # kind -> [window start, passed, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, _KIND_NUMBERS.sub("#", str(record.msg)[:200]))
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
