"""CURVE: only clients whose keys the node allows receive anything, and a wrong key fails clearly."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from perception.stream.client import Subscriber
from perception.stream.security import CurveError, CurveServer, generate_keys, main as keys_main

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    generate_keys(folder, names=("server", "client", "stranger"))
    return folder


def _secure_node(keys, model_dir):
    from perception.inference import load_backend
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.node.sources import open_source
    from perception.stream.publisher import Publisher

    pub = Publisher("tcp://127.0.0.1:*", "segnet",
                    curve=CurveServer(keys / "server.key_secret", keys / "client.key"))
    node = Node(open_source("synthetic://?width=64&height=48&fps=20&frames=100000", None),
                load_backend(model_dir, backend="torch"), pub, NodeSettings(), log=lambda m: None)
    t = threading.Thread(target=node.run, daemon=True)
    return node, pub, t


def _collect(sub: Subscriber, seconds: float) -> int:
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sub.recv(timeout=0.1) is not None:
            n += 1
    return n


def test_only_allowed_clients_receive_anything(keys, toy_model):
    _, model_dir = toy_model
    node, pub, t = _secure_node(keys, model_dir)
    allowed = Subscriber(pub.endpoint, topics=["segnet/mask"], curve=(keys / "server.key", keys / "client.key_secret"))
    stranger = Subscriber(pub.endpoint, topics=["segnet/mask"],
                          curve=(keys / "server.key", keys / "stranger.key_secret"))
    plain = Subscriber(pub.endpoint, topics=["segnet/mask"])
    wrong_server = Subscriber(pub.endpoint, topics=["segnet/mask"],
                              curve=(keys / "stranger.key", keys / "client.key_secret"))
    t.start()
    try:
        got = None
        deadline = time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            got = allowed.recv(timeout=0.2)
        assert got is not None and got.data.shape == (48, 64), "an allowed client receives masks"
        assert _collect(allowed, 1.0) > 0
        # Meanwhile the others have had the same time and more: nothing reached them.
        for sub in (stranger, plain, wrong_server):
            assert _collect(sub, 0.5) == 0
        assert stranger.handshake_failures >= 1 and wrong_server.handshake_failures >= 1
        assert pub.curve.rejected >= 1, "the node's authenticator turned the stranger away"
    finally:
        node.stop()
        t.join(timeout=30)
        for sub in (allowed, stranger, plain, wrong_server):
            sub.close()
        pub.close()


@pytest.mark.parametrize("client", ["echo", "record", "foxglove", "view"])
def test_a_wrong_server_key_is_a_clear_error_for_clients(client, keys, toy_model, capsys, tmp_path):
    if client == "echo":
        from perception.stream.consumers.echo import main as client_main
        extra = []
    elif client == "record":
        from perception.stream.consumers.record import main as client_main
        extra = ["--out", str(tmp_path / "rec")]
    elif client == "foxglove":
        pytest.importorskip("foxglove")
        from perception.stream.consumers.foxglove_bridge import main as client_main
        extra = ["--port", "0"]  # no --timeout: the bridge waits for a node; the handshake's refusal ends it
    else:
        pytest.importorskip("aiohttp")
        from perception.stream.consumers.view import main as client_main
        extra = ["--http", "127.0.0.1:0"]  # likewise

    _, model_dir = toy_model
    node, pub, t = _secure_node(keys, model_dir)
    t.start()
    try:
        wait = ["--timeout", "20"] if client in ("echo", "record") else []
        rc = client_main([pub.endpoint, *wait, "--curve-server-key", str(keys / "stranger.key"),
                          "--curve-secret-key", str(keys / "client.key_secret"), *extra])
    finally:
        node.stop()
        t.join(timeout=30)
        pub.close()
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if "ws://" not in line and "open http://" not in line]  # where the bridge or the view serves
    assert rc == 1 and len(err) == 1 and "CURVE handshake" in err[0] and "--curve-server-key" in err[0], err
    assert not (tmp_path / "rec").exists()  # nothing recorded: no folder left behind


def test_key_files_and_options_fail_in_one_line(keys, tmp_path, capsys, toy_model):
    from perception.stream.node.cli import main as node_main

    _, model_dir = toy_model
    with pytest.raises(CurveError, match="holds no secret key"):
        CurveServer(keys / "server.key", keys / "client.key")  # the public file where the pair belongs
    with pytest.raises(CurveError, match="no client .key file"):
        CurveServer(keys / "server.key_secret", tmp_path / "empty")
    assert keys_main(["generate", str(keys)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    base = ["--source", "synthetic://?frames=1", "--model", str(model_dir), "--backend", "torch",
            "--publish", "tcp://127.0.0.1:*"]
    for extra, text in [
        (["--curve-secret-key", str(keys / "server.key_secret")], "go together"),
        (["--curve-secret-key", str(tmp_path / "missing"), "--curve-allow", str(keys / "client.key")],
         "not a readable CURVE key file"),
    ]:
        assert node_main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert text in err[-1] and err[-1].startswith("perception-node: error:"), err
    # With CURVE, binding beyond loopback is no longer warned about.
    assert node_main(base[:-1] + ["tcp://0.0.0.0:*", "--curve-secret-key", str(keys / "server.key_secret"),
                                  "--curve-allow", str(keys)]) == 0
    assert "reachable from other machines" not in capsys.readouterr().err


def test_a_curve_server_started_right_after_another_stopped_gets_the_zap_endpoint(keys):
    """libzmq releases a closed socket's inproc endpoint asynchronously: a node restarted in the same process
    found the ZAP endpoint of the previous one's authenticator still bound (1 start in 3 failed here),
    and the publisher reported it as its TCP endpoint being in use."""
    ctx = zmq.Context()
    try:
        for _ in range(100):
            server = CurveServer(keys / "server.key_secret", keys / "client.key")
            sock = ctx.socket(zmq.XPUB)
            try:
                server.apply(sock)
                sock.bind("tcp://127.0.0.1:*")
            finally:
                sock.close(linger=0)
                server.stop()
    finally:
        ctx.term()


def test_two_curve_servers_on_one_context_is_a_clear_error(keys):
    from perception.stream.publisher import Publisher

    ctx = zmq.Context()
    first = Publisher("tcp://127.0.0.1:*", "a", context=ctx, curve=CurveServer(keys / "server.key_secret", keys / "client.key"))
    second_server = CurveServer(keys / "server.key_secret", keys / "client.key")
    second_server.zap_wait_s = 0.05
    try:
        with pytest.raises(CurveError, match="one per context"):
            Publisher("tcp://127.0.0.1:*", "b", context=ctx, curve=second_server)
        assert second_server._auth is None
    finally:
        first.close(linger_ms=0)
        ctx.term()  # returns: every socket either publisher opened is closed


def test_an_authenticator_that_cannot_bind_its_pipe_is_retried_not_hung(monkeypatch):
    """pyzmq's authenticator binds its pipe after the ZAP endpoint; if that bind fails, its stop() would block
    for good sending TERMINATE to a pipe with no peer. The retry closes the pipe first."""
    from zmq.auth.thread import ThreadAuthenticator

    from perception.stream import security

    ctx = zmq.Context()
    taken = ctx.socket(zmq.PAIR)
    taken.bind("inproc://perception-test-taken")
    made = []
    init = ThreadAuthenticator.__init__

    def first_one_gets_a_taken_pipe(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
        if len(made) == 1:
            self.pipe_endpoint = "inproc://perception-test-taken"

    monkeypatch.setattr(ThreadAuthenticator, "__init__", first_one_gets_a_taken_pipe)
    started = []
    worker = threading.Thread(target=lambda: started.append(security._start_authenticator(ctx, 2.0)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the retry hung on the failed authenticator's pipe"
    assert len(made) == 2 and started and started[0].is_alive()
    started[0].stop()
    taken.close(linger=0)
    ctx.term()


def test_a_revoked_key_is_refused_without_a_restart_and_refusals_are_in_stats(keys, toy_model, tmp_path):
    """Issue 45, item 8: revoking a client key needed a node restart, and refused handshakes were counted
    nowhere a user sees. The allow folder is read at every handshake now; the node's stats count refusals."""
    import shutil

    from perception.inference import load_backend
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.node.sources import open_source
    from perception.stream.publisher import Publisher

    _, model_dir = toy_model
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(keys / "client.key", allow / "client.key")
    pub = Publisher("tcp://127.0.0.1:*", "segnet", curve=CurveServer(keys / "server.key_secret", allow))
    node = Node(open_source("synthetic://?width=64&height=48&fps=20&frames=100000", None),
                load_backend(model_dir, backend="torch"), pub, NodeSettings(), log=lambda m: None)
    t = threading.Thread(target=node.run, daemon=True)
    client = (keys / "server.key", keys / "client.key_secret")
    first = Subscriber(pub.endpoint, topics=["segnet/mask"], curve=client)
    t.start()
    try:
        got, deadline = None, time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            got = first.recv(timeout=0.2)
        assert got is not None, "the allowed client receives"
        (allow / "client.key").unlink()  # revoked, node still running
        second = Subscriber(pub.endpoint, topics=["segnet/mask"], curve=client)
        try:
            deadline = time.monotonic() + 30
            while second.handshake_failures == 0 and time.monotonic() < deadline:
                assert second.recv(timeout=0.2) is None, "a revoked key must receive nothing"
            assert second.handshake_failures >= 1
        finally:
            second.close()
        assert node.stats()["curve_handshakes_refused"] >= 1
    finally:
        node.stop()
        t.join(timeout=30)
        first.close()
        pub.close()
