"""Receiving an upload: a multipart body streamed into the job's folder within a byte budget.

Starlette's ``request.form()`` spools the whole body to a temporary file before the route sees
any of it, so a 20 GB body would be written to /tmp before the size check. Here the file part
goes straight to its place in the job's folder as it arrives, the limits are counted chunk by
chunk (past them: 413 and the rest of the body is never read), and the few small form fields
are kept in memory. The file's suffix is checked as soon as its part header arrives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from layers.safety import TooLarge, UnsupportedFormat, UploadRefused, format_of
from twin.core.errors import InvalidParameter
from twin.core.settings import UploadSettings

if TYPE_CHECKING:  # python-multipart declares its callbacks' type for checkers only
    from python_multipart.multipart import MultipartCallbacks

# Multipart framing and the small form fields around the file.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 4096
MAX_PARTS = 32


@dataclass
class Received:
    """What a multipart upload held: the file (already on disk) and the form fields."""

    fields: dict[str, str | None]
    file_name: str = ""  # set with path: receive_upload returns none without a file
    path: Path | None = None
    size: int = 0


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    value: bytearray = field(default_factory=bytearray)
    sink: BinaryIO | None = None


def content_length_check(length: str | None, limits: UploadSettings) -> None:
    """413 before a byte is read when the declared length is already over the limit."""
    if length is not None and length.isdigit() \
            and int(length) > limits.max_file_bytes + FORM_OVERHEAD_BYTES:
        raise TooLarge(f"file: the upload ({length} bytes) is over the limit of "
                       f"{limits.max_file_bytes} bytes (TWIN_UPLOADS_MAX_FILE_BYTES)")


def boundary_of(content_type: str) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedFormat("uploads are multipart/form-data with the file in 'file'")
    return options[b"boundary"]


class _Receiver:
    """The parser's callbacks: one file part to disk, known fields to memory, budgets kept."""

    def __init__(self, folder: Path, allowed: tuple[str, ...], limits: UploadSettings,
                 stored_name):
        self.folder, self.allowed, self.limits = folder, allowed, limits
        self.stored_name = stored_name
        self.received = Received(dict.fromkeys(allowed))
        self.part = _Part()
        self.parts = 0
        self.header_name = self.header_value = b""
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadRefused(f"the form has more than {MAX_PARTS} parts; "
                                f"fields: file, {', '.join(self.allowed)}")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        if len(self.header_value) > MAX_FIELD_BYTES:
            raise UploadRefused("a multipart part header is too long")

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.part.name == "file":
            self._open_file(options.get(b"filename"))
        elif self.part.name not in self.allowed:
            raise InvalidParameter(f"form field {self.part.name!r} is not known; fields: "
                                   f"file, {', '.join(self.allowed)}")

    def _open_file(self, raw_name: bytes | None) -> None:
        if self.received.path is not None:
            raise UploadRefused("file: one file per upload (zip a Shapefile's parts)")
        if not raw_name:
            raise InvalidParameter("file: the part has no filename; send the layer's file "
                                   "as a multipart file part")
        name = raw_name.decode("utf-8", "replace").replace("\\", "/")
        file_name = PurePosixPath(name).name
        format_of(file_name)  # 415 for an unknown suffix before any of the file is read
        self.received.file_name = file_name
        self.received.path = self.folder / self.stored_name(file_name)
        self.part.sink = self.received.path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.sink is not None:
            self.received.size += end - start
            if self.received.size > self.limits.max_file_bytes:
                raise TooLarge(f"file: more than {self.limits.max_file_bytes} bytes is over "
                               "the upload limit (TWIN_UPLOADS_MAX_FILE_BYTES)")
            # A write to the page cache: microseconds, fine inside the event loop.
            self.part.sink.write(data[start:end])
            return
        self.part.value += data[start:end]
        if len(self.part.value) > MAX_FIELD_BYTES:
            raise UploadRefused(f"{self.part.name}: longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self.part.sink is not None:
            self.part.sink.close()
            self.part.sink = None
            return
        try:
            self.received.fields[self.part.name] = self.part.value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidParameter(f"{self.part.name}: not UTF-8 text") from None

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.part.sink is not None:
            self.part.sink.close()


async def receive_upload(chunks: AsyncIterator[bytes], content_type: str, folder: Path,
                         allowed: tuple[str, ...], limits: UploadSettings,
                         stored_name) -> Received:
    """Stream a multipart body into ``folder``; the caller removes the folder on failure.

    ``stored_name(file_name)`` names the file on disk (never the client's name as a path).
    """
    receiver = _Receiver(folder, allowed, limits, stored_name)
    parser = MultipartParser(boundary_of(content_type), receiver.callbacks())
    budget = limits.max_file_bytes + FORM_OVERHEAD_BYTES
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > budget:
                raise TooLarge(f"file: the upload is over the limit of {limits.max_file_bytes} "
                               "bytes (TWIN_UPLOADS_MAX_FILE_BYTES)")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise UploadRefused(f"the multipart body is malformed ({error})") from None
    finally:
        receiver.close()
    if not receiver.ended:
        raise UploadRefused("the multipart body ended before its closing boundary "
                            "(an interrupted upload?)")
    if receiver.received.path is None:
        raise InvalidParameter("file: required (the layer's file, as a multipart file part)")
    return receiver.received
