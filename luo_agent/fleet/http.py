"""A small asyncio HTTP/1.1 client for the coordinators: one request per connection, JSON bodies.

Enough for etcd's v3 HTTP/JSON gateway and a FleetLock server, and no more: ``http://``,
``https://`` (TLS, optionally with a client certificate) and ``unix://`` (etcd listening on a unix
socket).  It never blocks the loop; callers own timeouts (``asyncio.timeout``), and cancelling a
request closes its connection.  Credentials are read only from files that only root can read.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from ..errors import ConfigError, CoordinatorInvalid, CoordinatorUnavailable

MAX_RESPONSE: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise CoordinatorInvalid(
                f"HTTP {self.status} answer is not JSON: {self.body[:200]!r}"
            ) from None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to connect: a TCP host and port (TLS or not), or a unix socket path."""

    url: str
    host: str
    port: int
    tls: bool
    unix_path: str
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            path = parts.netloc + parts.path if parts.netloc else parts.path
            if not path.startswith("/"):
                # etcd 3.4 takes only unix://NAME:PORT and creates the socket file NAME:PORT in
                # its working directory: the URL copied from its flags does not say where.
                raise ConfigError(
                    "-",
                    "fleet.endpoints",
                    f"{url!r}: unix:// needs an absolute path (etcd's unix://{path} is the "
                    f"file {path!r} in etcd's working directory: unix:///that/directory/{path})",
                )
            return cls(url, "localhost", 0, False, path, "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("-", "fleet.endpoints", f"{url!r}: want http://, https:// or unix://")
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise ConfigError("-", "fleet.endpoints", f"{url!r}: bad port") from None
        return cls(url, parts.hostname, port, tls, "", parts.path.rstrip("/"))


def check_secret_file(path: Path, key: str) -> Path:
    """A credential file must belong to root and be unreadable by anyone else."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(str(path), key, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(str(path), key, "not a regular file")
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise ConfigError(
            str(path),
            key,
            f"credentials must be owned by root with no group or other access "
            f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
        )
    return path


def tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file is not None:
        if key_file is not None:
            check_secret_file(key_file, "fleet.key_file")
        else:
            check_secret_file(cert_file, "fleet.cert_file")  # the key is inside it
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


async def request(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Response:
    """One request; ``CoordinatorUnavailable`` if the endpoint cannot be reached or hangs up."""
    payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
    lines = [
        f"{method} {endpoint.base_path}{path} HTTP/1.1",
        f"Host: {endpoint.host}" + (f":{endpoint.port}" if endpoint.port else ""),
        "Connection: close",
        "Accept: application/json",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    writer: asyncio.StreamWriter | None = None
    try:
        if endpoint.unix_path:
            reader, writer = await asyncio.open_unix_connection(endpoint.unix_path)
        else:
            context = (tls or ssl.create_default_context()) if endpoint.tls else None
            reader, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=context
            )
        writer.write(head + payload)
        await writer.drain()
        raw = await reader.read(MAX_RESPONSE + 1)
        while chunk := await reader.read(MAX_RESPONSE + 1):
            raw += chunk
            if len(raw) > MAX_RESPONSE:
                break
    except (OSError, EOFError, ssl.SSLError) as exc:
        raise CoordinatorUnavailable(f"{endpoint.url}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
    if len(raw) > MAX_RESPONSE:
        raise CoordinatorInvalid(f"{endpoint.url}: answer larger than {MAX_RESPONSE} bytes")
    return _parse(endpoint, raw)


def _parse(endpoint: Endpoint, raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise CoordinatorUnavailable(f"{endpoint.url}: connection closed before an answer")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        version, code, *_ = status_line.split(" ", 2)
        status = int(code)
    except ValueError:
        raise CoordinatorInvalid(f"{endpoint.url}: not HTTP: {status_line[:80]!r}") from None
    if not version.startswith("HTTP/1."):
        raise CoordinatorInvalid(f"{endpoint.url}: not HTTP/1.x: {status_line[:80]!r}")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(endpoint, body)
    elif "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            raise CoordinatorInvalid(f"{endpoint.url}: bad Content-Length") from None
        if len(body) < length:
            raise CoordinatorUnavailable(f"{endpoint.url}: answer cut short")
        body = body[:length]
    return Response(status, body)


def _dechunk(endpoint: Endpoint, data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            raise CoordinatorUnavailable(f"{endpoint.url}: chunked answer cut short")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise CoordinatorInvalid(f"{endpoint.url}: bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            return bytes(out)
        if len(rest) < size + 2:
            raise CoordinatorUnavailable(f"{endpoint.url}: chunked answer cut short")
        out += rest[:size]
        data = rest[size + 2 :]
