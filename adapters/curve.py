"""CurveZMQ for remote use: key files, server-side authentication, and socket set-up.

A key directory made by `fm2s-stream keys DIR` holds `server.key(_secret)`, one client pair
`client.key(_secret)`, and `authorized/` with the public keys the server accepts (add a copy of
another client's `*.key` there to let it in). Only public keys ever leave the directory; the
format is pyzmq's `zmq.auth` certificate files, readable by any ZMQ binding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["CurveKeys", "curve_available", "make_keys", "secure_client", "secure_server", "start_authenticator"]


def curve_available() -> bool:
    """True when the linked libzmq supports CURVE (pyzmq's wheels do)."""
    return bool(zmq.has("curve"))


class CurveKeys:
    """The key directory: where each key lives, with loading that fails with a clear message."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def authorized(self) -> Path:
        """Folder of public client keys the server accepts."""
        return self.directory / "authorized"

    def load(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        """(public, secret) key of `name` ('server' or 'client'); secret is None for public files."""
        path = self.directory / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.is_file():
            raise ValueError(f"CurveZMQ key {path} not found (create keys with: fm2s-stream keys {self.directory})")
        public, secret_key = zmq.auth.load_certificate(path)
        if secret and not secret_key:
            raise ValueError(f"{path} holds no secret key")
        return public, secret_key


def make_keys(directory: str | Path) -> dict[str, str]:
    """Create a server and a client key pair in a new (or empty) directory; authorise the client."""
    if not curve_available():
        raise RuntimeError("this libzmq has no CURVE support")
    keys = CurveKeys(directory)
    keys.directory.mkdir(parents=True, exist_ok=True)
    if any(keys.directory.iterdir()):
        raise ValueError(f"{keys.directory} is not empty; refusing to overwrite keys")
    server_pub, server_sec = zmq.auth.create_certificates(keys.directory, "server")
    client_pub, client_sec = zmq.auth.create_certificates(keys.directory, "client")
    keys.authorized.mkdir()
    shutil.copy(client_pub, keys.authorized / "client.key")
    for secret in (server_sec, client_sec):
        Path(secret).chmod(0o600)
    return {"server_public": server_pub, "server_secret": server_sec, "client_public": client_pub,
            "client_secret": client_sec, "authorized": str(keys.authorized)}


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    """Start the ZAP handler of `context` accepting exactly the public keys in `authorized/`."""
    if not keys.authorized.is_dir() or not any(keys.authorized.glob("*.key")):
        raise ValueError(f"no authorised client keys in {keys.authorized}")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    return auth


def secure_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make a socket (before bind) a CURVE server with the server's key pair."""
    public, secret = keys.load("server", secret=True)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make a socket (before connect) a CURVE client of the server in `keys`."""
    public, secret = keys.load("client", secret=True)
    server_public, _ = keys.load("server", secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public
