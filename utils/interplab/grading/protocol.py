"""The frames a grading worker sends to the grader: JSON plus raw bytes, never pickle.

A frame is ``b"IPL1"``, the JSON length (4 bytes) and the blob length (8 bytes), big-endian,
then the JSON text (an object) and the blob (safetensors bytes of a case's tensors, or empty).
`FrameReader` enforces size limits, so a worker that floods the channel costs the grader
no more than one frame's worth of memory before it is stopped.
"""

from __future__ import annotations

import json
import os
import struct

MAGIC = b"IPL1"
HEADER = struct.Struct(">4sIQ")
MAX_JSON = 4_000_000
MAX_BLOB = 64_000_000  # far above any case output; a bigger frame ends the worker


class ProtocolViolation(Exception):
    pass


def frame(record: dict, blob: bytes = b"") -> bytes:
    text = json.dumps(record).encode()
    return HEADER.pack(MAGIC, len(text), len(blob)) + text + blob


def write_frame(fd: int, record: dict, blob: bytes = b"") -> None:
    data = memoryview(frame(record, blob))
    while data:
        n = os.write(fd, data)
        data = data[n:]


class FrameReader:
    """Reads frames from a file descriptor; raises ProtocolViolation on anything malformed or too big."""

    def __init__(self, fd: int, max_blob: int = MAX_BLOB):
        self.fd = fd
        self.max_blob = max_blob

    def _exact(self, n: int) -> bytes | None:
        parts, got = [], 0
        while got < n:
            chunk = os.read(self.fd, min(n - got, 1 << 20))
            if not chunk:
                if got == 0:
                    return None
                raise ProtocolViolation("the worker's message was cut off")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def read(self) -> tuple[dict, bytes] | None:
        """The next frame, or None at a clean end of stream."""
        head = self._exact(HEADER.size)
        if head is None:
            return None
        if len(head) < HEADER.size:
            raise ProtocolViolation("the worker's message was cut off")
        magic, n_json, n_blob = HEADER.unpack(head)
        if magic != MAGIC:
            raise ProtocolViolation("the worker sent bytes that are not a grading message")
        if n_json > MAX_JSON or n_blob > self.max_blob:
            raise ProtocolViolation(f"the worker sent a message of {(n_json + n_blob) / 1e6:.0f} MB, over the limit")
        text = self._exact(n_json) or b""
        blob = self._exact(n_blob) or b"" if n_blob else b""
        try:
            record = json.loads(text.decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ProtocolViolation(f"the worker sent malformed JSON ({e})") from e
        if not isinstance(record, dict):
            raise ProtocolViolation("the worker sent a message that is not a JSON object")
        return record, blob
