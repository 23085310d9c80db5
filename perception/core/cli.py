"""Shared bits of the command-line tools."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["stop_on_signals", "fail", "print_notes"]

EXIT_USAGE = 2  # bad input: a flag, a file, a model (argparse's status for usage errors too)


def fail(prog: str, message: str, *, status: int = EXIT_USAGE) -> int:
    """Print ``prog: error: message`` as one line on stderr and return ``status``, for ``return fail(...)``."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return status


def print_notes(notes: list[str]) -> None:
    """The notes a library call returned (``"warning: ..."``, ``"note: ..."``), one line each on stderr."""
    for note in notes:
        print(note, file=sys.stderr, flush=True)


def stop_on_signals(callback: Callable[[], None] | None = None) -> threading.Event:
    """An Event set by SIGINT, SIGTERM or SIGHUP (a closed terminal) (and ``callback`` called), for a
    graceful stop: the caller finishes cleanly (final stats, closed files) instead of dying mid-write.

    Handlers can only be installed from the main thread; elsewhere (tests calling ``main()`` from a
    thread) the event is returned without handlers.
    """
    event = threading.Event()

    def on_signal(signum, frame) -> None:
        event.set()
        if callback is not None:
            callback()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, on_signal)
    return event
