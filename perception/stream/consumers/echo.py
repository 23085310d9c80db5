"""``perception-echo``: print a node's messages (headers, not pixels) and their rates, like
``ros2 topic echo`` and ``ros2 topic hz``.

    perception-echo tcp://127.0.0.1:5555                 # everything
    perception-echo tcp://127.0.0.1:5555 segnet/mask     # one topic (a prefix)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict, deque

from dataclasses import dataclass

from perception.core.cli import fail
from perception.core.options import add_arguments, at_least, opt, parse_into, positive
from perception.stream.client import NODE_GONE_S
from perception.stream.protocol import json_text
from perception.stream.security import ClientKeyOptions

__all__ = ["EchoOptions", "build_parser", "main", "summarize", "class_areas"]


@dataclass(kw_only=True)
class EchoOptions(ClientKeyOptions):
    """perception-echo's options: its arguments come from these fields (core.options)."""

    endpoint: str = opt(flag="endpoint", help="the node's endpoint, e.g. tcp://127.0.0.1:5555")
    topic: str = opt("", flag="topic", nargs="?", help="topic prefix to subscribe to (default: all)")
    count: int | None = opt(None, check=at_least(1), metavar="N", help="exit after N messages")
    timeout: float | None = opt(None, check=positive, metavar="SECONDS",
                                help="exit with status 1 if nothing arrives for this many seconds")
    gone_after: float = opt(NODE_GONE_S, check=positive, metavar="SECONDS",
                            help=f"stop (status 1) when the node has been disconnected this long without its final "
                                 f"stats: killed, or its machine lost (default {NODE_GONE_S:g}; a node restarted "
                                 "sooner is followed on)")
    rate_only: bool = opt(False, help="print only the per-topic rates, once a second")
    json: bool = opt(False, help="one JSON object per message")
    areas: bool = opt(False, help="with each mask, the share of the view per class (its header's class_pixels), "
                                  "largest first")
    stay: bool = opt(False, help="keep listening after the node's final stats (default: exit 0 when the node says "
                                 "it is done)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-echo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, EchoOptions)
    return p


def class_areas(header: dict, classes: list[str] | None = None) -> str:
    """``Road 41.2% Sky 20.1% ...``: a mask header's class_pixels as percentages, largest first, zeros left out."""
    counts = header.get("class_pixels") or []
    total = sum(counts) or 1
    names = classes if classes and len(classes) == len(counts) else [str(i) for i in range(len(counts))]
    order = sorted((c, n) for c, n in zip(counts, names) if c)[::-1]
    return " ".join(f"{n} {100 * c / total:.1f}%" for c, n in order)


def summarize(msg, *, areas: bool = False, classes: list[str] | None = None) -> str:
    h = msg.header
    if h.get("encoding") == "msgpack":
        return f"{msg.topic} seq={h['seq']} " + json_text(msg.data, separators=(",", ":"))[:400]
    lat = h.get("latency_ms", {})
    lat_s = " ".join(f"{k}={v:.1f}" for k, v in lat.items())
    return (f"{msg.topic} seq={h['seq']} stamp_ns={h['stamp_ns']} frame_id={h['frame_id']} "
            f"{h.get('width')}x{h.get('height')} {h['encoding']} step={h.get('step')} {lat_s}"
            + (f" | {class_areas(h, classes)}" if areas and "class_pixels" in h else ""))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_into(build_parser(), EchoOptions, argv)
    except ValueError as e:
        return fail("perception-echo", str(e))
    from perception.core.cli import stop_on_signals

    from perception.stream.client import Subscriber

    stopped = stop_on_signals()
    import zmq

    from perception.stream.security import CurveError, client_keys_from_args

    try:
        sub_ctx = Subscriber(args.endpoint, topics=args.topic, decode_jpeg=False, curve=client_keys_from_args(args))
    except CurveError as e:
        return fail("perception-echo", str(e))
    except zmq.ZMQError as e:
        return fail("perception-echo", f"cannot connect to {args.endpoint!r} ({e}); expected e.g. tcp://127.0.0.1:5555")
    with sub_ctx as sub:
        rc = _echo(sub, args, stopped)
        if sub.losses():
            print(f"perception-echo: {sub.losses()}", file=sys.stderr, flush=True)
    return rc


def _echo(sub, args: argparse.Namespace, stopped) -> int:
    """Print messages until --count, --timeout, a signal or the node's final stats; the exit status."""
    from perception.stream.client import follow

    rates = _Rates()
    classes: list[str] | None = None  # names for --areas, from the node's info message
    following = follow(sub, gone_after=args.gone_after, count=args.count, timeout=args.timeout,
                       until_final=not args.stay, stopped=stopped,
                       idle=True, warn=lambda m: print(f"perception-echo: warning: {m}", file=sys.stderr, flush=True))
    for msg in following:
        now = time.monotonic()
        if msg is not None:
            if msg.stream == "info" and isinstance(msg.data, dict) and isinstance(msg.data.get("classes"), list):
                classes = [str(c) for c in msg.data["classes"]]
            rates.arrived(msg.topic, now)
            if args.json:
                data = msg.data if isinstance(msg.data, dict) else None
                print(json_text({"topic": msg.topic, "header": msg.header, "data": data}), flush=True)
            elif not args.rate_only:
                print(summarize(msg, areas=args.areas, classes=classes), flush=True)
        if (args.rate_only or args.count is None) and (line := rates.line(now)) and args.rate_only:
            print(line, flush=True)
    return end_status("perception-echo", following, args.endpoint)


def end_status(prog: str, following, endpoint: str) -> int:
    """The exit status (and one line on stderr) for why :func:`~perception.stream.client.follow` ended."""
    from perception.stream.security import handshake_failed

    if following.end == "handshake":
        return fail(prog, handshake_failed(endpoint), status=1)
    if following.end == "silence":
        print(f"{prog}: nothing received for {following.timeout:g}s on {endpoint}", file=sys.stderr)
        return 1
    if following.end == "gone":
        print(f"{prog}: the node at {endpoint} went away without its final stats ({following.gone_after:g}s "
              "disconnected: killed, or its machine lost)", file=sys.stderr)
        return 1
    return 0


class _Rates:
    """Per-topic message rates over the last 5 s, as a line once a second (``ros2 topic hz``)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, deque] = defaultdict(lambda: deque(maxlen=200))
        self.next_line = time.monotonic() + 1.0

    def arrived(self, topic: str, now: float) -> None:
        self.arrivals[topic].append(now)

    def line(self, now: float) -> str:
        """The rates line when a second has passed since the last one, else ""."""
        if now < self.next_line:
            return ""
        self.next_line = now + 1.0
        rates = []
        for topic, ts in sorted(self.arrivals.items()):
            recent = [t for t in ts if now - t < 5.0]
            hz = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            rates.append(f"{topic}: {hz:.2f} Hz")
        return "  ".join(rates)


if __name__ == "__main__":
    sys.exit(main())
