#!/usr/bin/env python3
"""Flood ``perception-foxglove`` with half-open WebSocket handshakes (Slowloris) and measure what a real
client then sees (docs/reliability.md, issue 45 item 11):

    python tools/probe_bridge_flood.py --connections 3000

Starts a bridge (against a bare ZeroMQ publisher), holds N connections that send half an upgrade request
and never finish it, then reports the bridge's open file descriptors, how long a real Foxglove client
(``websockets``, subprotocol ``foxglove.sdk.v1``) takes to get the server's ``serverInfo``, how long the
bridge takes to stop on SIGTERM, and how many lines it logged. Raise ``ulimit -n`` above N first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client_wait(port: int, limit_s: float) -> float | None:
    import websockets

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}", subprotocols=["foxglove.sdk.v1"],
                                          open_timeout=2) as ws:
                if json.loads(await asyncio.wait_for(ws.recv(), 5))["op"] == "serverInfo":
                    return time.monotonic() - t0
        except (OSError, asyncio.TimeoutError, Exception):  # noqa: BLE001  (refused, reset, timed out: try again)
            await asyncio.sleep(0.2)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=3000)
    p.add_argument("--client-limit", type=float, default=60.0, help="seconds the real client keeps trying")
    args = p.parse_args(argv)
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    zmq_port = pub.bind_to_random_port("tcp://127.0.0.1")
    ws_port = _free_port()
    bridge = subprocess.Popen([sys.executable, "-m", "perception.stream.consumers.foxglove_bridge",
                               f"tcp://127.0.0.1:{zmq_port}", "--port", str(ws_port)], stderr=subprocess.PIPE, text=True)
    try:
        while True:  # the bridge listens
            try:
                socket.create_connection(("127.0.0.1", ws_port), timeout=1).close()
                break
            except OSError:
                if bridge.poll() is not None:
                    print(bridge.stderr.read(), file=sys.stderr)
                    return 1
                time.sleep(0.1)
        held = []
        t0 = time.monotonic()
        for _ in range(args.connections):
            s = socket.create_connection(("127.0.0.1", ws_port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Slow: ")
            held.append(s)
        fds = len(os.listdir(f"/proc/{bridge.pid}/fd"))
        print(f"{len(held)} half-open connections opened in {time.monotonic() - t0:.1f} s; bridge holds {fds} fds")
        waited = asyncio.run(_client_wait(ws_port, args.client_limit))
        print("a Foxglove client got serverInfo after " + (f"{waited:.1f} s" if waited is not None else
                                                            f"more than {args.client_limit:g} s (never)"))
        t_stop = time.monotonic()
        bridge.send_signal(signal.SIGTERM)
        try:
            err = bridge.communicate(timeout=20)[1]
            print(f"bridge stopped {time.monotonic() - t_stop:.1f} s after SIGTERM, rc {bridge.returncode}, "
                  f"{len(err.splitlines())} log lines")
        except subprocess.TimeoutExpired:
            print("bridge did not stop within 20 s of SIGTERM")
        for s in held:
            s.close()
        return 0
    finally:
        if bridge.poll() is None:
            bridge.kill()
        pub.close(0)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
