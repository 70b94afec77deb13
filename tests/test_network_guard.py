"""The suite itself refuses network access, in this process and in the processes it starts."""

import socket
import subprocess
import sys

import pytest


def test_outbound_connection_is_refused_at_once():
    with pytest.raises(OSError, match="blocked in interplab's test suite"):
        socket.create_connection(("huggingface.co", 443), timeout=5)


def test_subprocesses_are_guarded_too():
    code = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=5)\nexcept OSError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "blocked in interplab's test suite" in out


def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()
    server.close()
