"""Refuse network access in every Python process the test suite starts.

The test suite puts this folder on PYTHONPATH, so notebook kernels and CLI
subprocesses import it at start-up too. Loopback and Unix sockets (Jupyter's
kernel channels) still work; anything else raises at once, so a hidden download
fails loudly instead of hanging.
"""

import os

if os.environ.get("INTERPLAB_BLOCK_NETWORK") == "1":
    import socket

    class NetworkBlockedError(ConnectionRefusedError):
        pass

    _LOCAL = ("127.", "::1", "localhost", "0.0.0.0")
    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(sock, address):
        if sock is not None and sock.family == getattr(socket, "AF_UNIX", None):
            return
        host = address[0] if isinstance(address, tuple) else str(address)
        if not str(host).startswith(_LOCAL):
            raise NetworkBlockedError(
                f"network access to {address!r} is blocked in interplab's test suite: "
                "tests must run offline (a hidden download would fail here)."
            )

    def connect(self, address):
        _check(self, address)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return _connect_ex(self, address)

    _getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not str(host).startswith(_LOCAL) and host not in ("", b""):
            _check(None, (host if isinstance(host, str) else host.decode(), 0))
        return _getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.NetworkBlockedError = NetworkBlockedError
