"""ZeroMQ CURVE encryption and authentication for a node that serves other machines.

    perception-keys generate keys/            # server.key, server.key_secret, client.key, client.key_secret
    perception-node ... --publish tcp://0.0.0.0:5555 \\
        --curve-secret-key keys/server.key_secret --curve-allow keys/client.key   # or a folder of *.key
    perception-echo tcp://robot:5555 --curve-server-key keys/server.key --curve-secret-key keys/client.key_secret

Key files are pyzmq's ``zmq.auth`` certificates (Z85 text; ``*.key`` public, ``*.key_secret`` both
halves). The node's ZAP authenticator admits only the client public keys in ``--curve-allow``: any
other client completes no handshake and receives nothing. Give each client machine its own key pair
(``perception-keys generate DIR --name robot-arm``) and list its ``.key`` file on the node.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq

from perception.core.cli import fail
from perception.core.options import add_arguments, opt, parse_into

__all__ = ["CurveError", "generate_keys", "load_public_key", "load_key_pair", "CurveServer",
           "configure_client", "add_client_arguments", "client_keys_from_args", "build_parser", "main"]


class CurveError(ValueError):
    """A key file that is missing, unreadable, or of the wrong kind."""


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveError("this libzmq was built without CURVE support")


def generate_keys(folder: str | Path, *, names: tuple[str, ...] = ("server", "client"), force: bool = False) -> list[Path]:
    """A key pair per name in ``folder``: ``NAME.key`` (public, to hand out) and ``NAME.key_secret``
    (kept private, mode 0600). Existing files are not overwritten unless ``force``."""
    import zmq.auth

    _require_curve()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not force:
        taken = [folder / f"{n}{s}" for n in names for s in (".key", ".key_secret") if (folder / f"{n}{s}").exists()]
        if taken:
            raise CurveError(f"{taken[0]} exists; choose another folder or --force")
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(str(folder), name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


def _load_certificate(path: str | Path) -> tuple[bytes | None, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveError(f"{path}: not a readable CURVE key file ({e})") from None


def load_public_key(path: str | Path) -> bytes:
    public, _ = _load_certificate(path)
    if not public:
        raise CurveError(f"{path}: holds no public key")
    return public


def load_key_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``*.key_secret`` file."""
    public, secret = _load_certificate(path)
    if not secret:
        raise CurveError(f"{path}: holds no secret key (pass the .key_secret file)")
    return public, secret


class CurveServer:
    """Makes a bound socket a CURVE server and runs the ZAP authenticator that admits only the
    allowed client keys. ``allow``: one ``.key`` file or a folder of them, read again at every handshake:
    removing a client's key refuses its next connection without restarting the node (a client already
    connected stays connected until it reconnects). Refused handshakes are counted in :attr:`rejected`."""

    def __init__(self, secret_key_file: str | Path, allow: str | Path) -> None:
        _require_curve()
        self.public, self.secret = load_key_pair(secret_key_file)
        self.allow_path = Path(allow)
        self.allowed = self._read_allowed(strict=True)
        self.rejected = 0
        self._auth = None
        self.zap_wait_s = ZAP_WAIT_S

    def _read_allowed(self, *, strict: bool = False) -> set[bytes]:
        """The allowed public keys now. At start (``strict``) a missing or bad allow list is an error; later
        one that has gone or cannot be read allows no one."""
        allow = self.allow_path
        files = sorted(allow.glob("*.key")) if allow.is_dir() else [allow]
        try:
            if not files or not all(f.is_file() for f in files):
                raise CurveError(f"--curve-allow {allow}: no client .key file there")
            return {load_public_key(f) for f in files}
        except (CurveError, OSError):
            if strict:
                raise
            return set()

    # zmq.auth's credentials-provider interface
    def callback(self, domain: str, key: bytes) -> bool:
        from zmq.utils import z85

        self.allowed = self._read_allowed()  # per handshake: a revoked key is refused from now on
        ok = z85.encode(key) in self.allowed if len(key) == 32 else key in self.allowed
        if not ok:
            self.rejected += 1
        return ok

    def apply(self, sock: zmq.Socket) -> None:
        """Call before bind: starts the authenticator on the socket's context."""
        if self._auth is None:
            self._auth = _start_authenticator(sock.context, self.zap_wait_s)
            self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


# libzmq closes a socket asynchronously (its reaper thread), so the ZAP endpoint of an authenticator
# that was just stopped stays bound for a few milliseconds: a CURVE server started right after another
# stopped (a node restarted in the same process) waits that long instead of failing.
ZAP_WAIT_S = 2.0


def _start_authenticator(context: zmq.Context, wait_s: float):
    """A started ZAP authenticator on ``context``. ZAP is one endpoint per context
    (inproc://zeromq.zap.01): wait up to ``wait_s`` for a stopped one to release it."""
    import time

    from zmq.auth.thread import ThreadAuthenticator

    deadline = time.monotonic() + wait_s
    while True:
        auth = ThreadAuthenticator(context)
        try:
            auth.start()
            return auth
        except zmq.ZMQError as e:
            # Its pipe (if made) has no peer yet: stop() would block sending TERMINATE on it.
            if getattr(auth, "pipe", None) is not None:
                auth.pipe.close(linger=0)
                auth.pipe = None
            auth.stop()  # now closes just the ZAP socket it made
            if e.errno != zmq.EADDRINUSE:
                raise
            if time.monotonic() >= deadline:
                raise CurveError("another CURVE server's authenticator runs on this ZeroMQ context "
                                 "(one per context: stop it, or give this server its own context)") from None
            time.sleep(0.005)


def configure_client(sock: zmq.Socket, server_key_file: str | Path, secret_key_file: str | Path) -> None:
    """Make a socket a CURVE client of the server whose public key is in ``server_key_file``
    (call before connect)."""
    _require_curve()
    public, secret = load_key_pair(secret_key_file)
    sock.curve_serverkey = load_public_key(server_key_file)
    sock.curve_publickey = public
    sock.curve_secretkey = secret


@dataclass(kw_only=True)
class ClientKeyOptions:
    """A consumer's CURVE options (each consumer's options dataclass extends it)."""

    curve_server_key: str | None = opt(None, metavar="FILE",
                                       help="the node's public key (server.key): encrypt and authenticate with CURVE")
    curve_secret_key: str | None = opt(None, metavar="FILE",
                                       help="this client's key pair (client.key_secret), listed on the node with "
                                            "--curve-allow")


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ClientKeyOptions)


def handshake_failed(endpoint: str) -> str:
    """The one line a client prints when the node refused its CURVE handshake."""
    return (f"the CURVE handshake with {endpoint} failed (wrong --curve-server-key, this client's key is not "
            "allowed, or the node does not use CURVE)")


def client_keys_from_args(args: argparse.Namespace) -> tuple[str, str] | None:
    """(server key file, secret key file), None without CURVE; both or neither must be given."""
    server, secret = getattr(args, "curve_server_key", None), getattr(args, "curve_secret_key", None)
    if bool(server) != bool(secret):
        raise CurveError("--curve-server-key and --curve-secret-key go together")
    if server:
        load_public_key(server)  # fail at start, naming the file
        load_key_pair(secret)
        return server, secret
    return None


@dataclass
class GenerateKeysOptions:
    """``perception-keys generate``: its arguments come from these fields (core.options)."""

    folder: str = opt(flag="folder", help="where the key files go")
    name: list[str] | None = opt(None, repeat=True, help="key pair name (repeatable; default: server and client)")
    force: bool = opt(False, help="overwrite existing key files")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("generate", help="write CURVE key pairs"), GenerateKeysOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_into(build_parser(), GenerateKeysOptions, argv)  # one subcommand: generate
    try:
        written = generate_keys(args.folder, names=tuple(args.name or ("server", "client")), force=args.force)
    except (CurveError, OSError) as e:
        return fail("perception-keys", str(e))
    for path in written:
        print(path)
    print("hand out the .key files; keep the .key_secret files private", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
