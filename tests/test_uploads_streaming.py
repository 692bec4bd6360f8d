"""The upload body is streamed: the key is checked before a byte of it is read, the size limit
is enforced while it arrives (413 mid-body, the rest never read), chunked uploads work.

A raw socket plays the client so the test sees when the server answers: a response that
arrives while most of the body is still unsent proves the server did not wait for (or spool)
the whole body.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from tests.uploads import EDITOR, LIMITS, geojson_points, wait

# The upload server and its client (fixtures shared by the upload tests).

BOUNDARY = "twin-test-boundary-7c1f"
CHUNK = 64 * 1024


def multipart_head(file_name: str, title: str = "streamed") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n{title}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode()


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


class RawUpload:
    """POST /layers over a bare socket: send what we like, notice the answer as it comes."""

    def __init__(self, url: str, headers: dict[str, str]):
        parsed = urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
        self.sock.setblocking(False)
        self.sent = 0
        self.answer = b""
        lines = ["POST /layers HTTP/1.1", f"Host: {parsed.netloc}",
                 f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._send_all(("\r\n".join(lines) + "\r\n\r\n").encode(), count=False)

    def _send_all(self, data: bytes, count: bool = True) -> bool:
        """Send unless the server has answered (or closed); False once it has."""
        view = memoryview(data)
        while view:
            readable, writable, _ = select.select([self.sock], [self.sock], [], 30)
            if readable:
                self._read()
                return False
            if writable:
                try:
                    n = self.sock.send(view)
                except (BrokenPipeError, ConnectionResetError):
                    return False
                view = view[n:]
                self.sent += n if count else 0
        return True

    def send_body(self, pieces: Iterator[bytes]) -> None:
        for piece in pieces:
            if not self._send_all(piece):
                return

    def _read(self) -> None:
        try:
            self.answer += self.sock.recv(65536)
        except (BlockingIOError, ConnectionResetError):
            pass

    def response(self, timeout: float = 30) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.answer and time.monotonic() < deadline:
            if select.select([self.sock], [], [], 0.1)[0]:
                before = len(self.answer)
                self._read()
                if len(self.answer) == before:
                    break  # closed
        self.sock.close()
        head, _, body = self.answer.partition(b"\r\n\r\n")
        assert head, "no response from the server"
        return int(head.split()[1]), body


def chunked(pieces: Iterator[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def endless_file(total: int) -> Iterator[bytes]:
    block = b" " * CHUNK
    for _ in range(total // CHUNK):
        yield block


def test_no_key_is_refused_before_the_body_is_read(upload_server, uploads_dir):
    declared = LIMITS.max_file_bytes  # within the limit, so only the key can stop it
    raw = RawUpload(upload_server.url, {"Content-Length": str(declared)})
    raw.send_body(iter([multipart_head("a.geojson") + b"{" + b" " * 1000]))
    status, body = raw.response()
    assert status == 401, body
    assert raw.sent < 5000  # the server answered with almost all of the body unsent
    assert not any((uploads_dir / "jobs").glob("*"))


def test_declared_length_over_the_limit_is_refused_at_once(upload_server):
    raw = RawUpload(upload_server.url, {**EDITOR, "Content-Length": str(10**10)})
    status, body = raw.response()
    assert status == 413 and b"TWIN_UPLOADS_MAX_FILE_BYTES" in body
    assert raw.sent == 0


def test_chunked_body_over_the_limit_is_cut_off_with_413(api, upload_server, uploads_dir):
    """No Content-Length: the limit is counted as the chunks arrive."""
    intended = 200 * 1024 * 1024
    raw = RawUpload(upload_server.url, {**EDITOR, "Transfer-Encoding": "chunked"})
    raw.send_body(chunked(iter([multipart_head("big.geojson"), b"{",
                                *endless_file(intended)])))
    status, body = raw.response()
    assert status == 413 and b"TWIN_UPLOADS_MAX_FILE_BYTES" in body, body
    # Socket buffers on loopback hold a few MB; the server read little past the limit.
    assert raw.sent < LIMITS.max_file_bytes + 32 * 1024 * 1024 < intended
    assert not any((uploads_dir / "jobs").glob("*")), "a spooled part was left behind"
    assert api.get("/healthz").status_code == 200


def test_chunked_upload_within_the_limit_is_published(api):
    def body() -> Iterator[bytes]:
        yield multipart_head("chunked.geojson", "chunked upload")
        content = geojson_points()
        for start in range(0, len(content), 100):
            yield content[start:start + 100]
        yield multipart_tail()

    response = api.post("/layers", content=body(), headers={
        **EDITOR, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert response.status_code == 202, response.text
    assert "content-length" not in {k.lower() for k in response.request.headers}
    job = wait(api, response.json())
    assert job["state"] == "succeeded", job
    assert api.get(f"/collections/{job['layer_id']}").json()["featureCount"] == 3


def form(fields: dict[str, str], file: tuple[str, bytes] | None) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
             f"{value}\r\n".encode() for name, value in fields.items()]
    if file:
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{file[0]}\"\r\n\r\n".encode() + file[1] + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize("fields,file,status,reason", [
    ({"title": "x", "colour": "red"}, ("a.geojson", b"{}"), 400, "'colour' is not known"),
    ({"title": "x"}, None, 400, "file: required"),
    ({"title": "x"}, ("a.exe", b"MZ"), 415, "allowed suffixes"),
    ({"title": "x" * 5000}, ("a.geojson", b"{}"), 400, "title: longer than"),
])
def test_bad_forms_name_the_field(api, uploads_dir, fields, file, status, reason):
    response = api.post("/layers", content=form(fields, file), headers={
        **EDITOR, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert response.status_code == status, response.text
    assert reason in response.json()["description"]
    assert not any((uploads_dir / "jobs").glob("*"))


def test_a_body_that_stops_early_leaves_nothing(upload_server, uploads_dir):
    raw = RawUpload(upload_server.url, {**EDITOR, "Transfer-Encoding": "chunked"})
    raw.send_body(chunked(iter([multipart_head("cut.geojson"), b'{"type": "Feat'])))
    status, body = raw.response()
    assert status == 400 and b"closing boundary" in body
    assert not any((uploads_dir / "jobs").glob("*"))
