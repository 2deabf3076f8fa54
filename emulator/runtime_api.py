"""The Lambda Runtime API (version 2018-06-01), server side, for one execution environment.

A handler written in any language runs in a process of its own that speaks this HTTP API to the
endpoint named by `AWS_LAMBDA_RUNTIME_API` (`127.0.0.1:<port>`): it asks for work with
`GET /2018-06-01/runtime/invocation/next`, which is held open until there is an invocation, and answers
with `POST .../invocation/{id}/response` or `POST .../invocation/{id}/error`; a failed init is reported
with `POST .../runtime/init/error`. Each environment gets its own listening socket, because the official
clients split `AWS_LAMBDA_RUNTIME_API` into host and port (a path prefix could not tell environments
apart).

`RuntimeEndpoint` is driven by the supervisor's `Loop`: non-blocking sockets, one callback per readable or
writable socket, nothing that waits. It turns requests into calls on a `RuntimeListener` (the supervisor)
and answers the held `GET /next` when the supervisor calls `deliver`. The contract with the supervisor is
Lambda's own: init ends at the first `GET /next`; after a response the runtime asks for the next
invocation, and while that request is pending (`next_pending`) the process may be frozen, for minutes.

Behaviour follows the Runtime Interface Emulator (aws-lambda-runtime-interface-emulator, `rapi/`): the same
paths and headers, 202 `{"status":"OK"}` for accepted posts, 400 `InvalidRequestID` for a request id that
is not the invocation in progress, 404 for unknown paths, 413 `RequestEntityTooLarge` over the payload
limit. The process is user code, so what it sends is bounded (header block 16 KiB, body `max_body`,
connections 16) and checked before use; anything malformed becomes one `on_protocol_error` for this
environment (an answer to the runtime where possible, then every connection closed) and never an
exception out of the loop's callback. One difference from Lambda, which fails just that invocation with
`Function.ResponseSizeTooLarge` and keeps the environment: here a body over `max_body` is a protocol
error, so the supervisor discards the environment.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse
from typing import Protocol

import h11

from .loop import Loop

API_VERSION = "2018-06-01"
_PREFIX = f"/{API_VERSION}/runtime/"

#: Lambda's invocation payload limit (6 MiB; the Runtime Interface Emulator adds 100 bytes of slack).
MAX_BODY_BYTES = 6 * 2**20
#: Largest request line + header block (h11's default; the official clients send a few hundred bytes).
MAX_HEADER_BYTES = 16 * 1024
#: Client connections open at once. The official Node client keeps one alive; a curl-per-request
#: bootstrap opens one per request and closes it. More than this at once is a runtime gone wrong.
MAX_CONNECTIONS = 16
#: Longest error type kept from a `Lambda-Runtime-Function-Error-Type` header.
MAX_ERROR_TYPE_CHARS = 256
_RECV_BYTES = 256 * 1024

ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
#: What deliver() accepts in a header value: visible ASCII and spaces (no CR/LF to split headers with).
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


class RuntimeListener(Protocol):
    """What the endpoint tells its owner (the supervisor). Each call comes from a loop callback, after the
    endpoint has answered the request (or, for `on_next`, while that request is held)."""

    def on_next(self) -> None:
        """The runtime asked for the next invocation (`GET /next`, now held open). The first call is the
        end of init; later ones follow a response or an error. The process may be frozen from now on."""

    def on_response(self, request_id: str, body: bytes) -> None:
        """The invocation `request_id` succeeded; `body` is the function's result (JSON, at most `max_body`)."""

    def on_error(self, request_id: str, error_type: str, body: bytes) -> None:
        """The invocation `request_id` failed. `error_type` is the `Lambda-Runtime-Function-Error-Type`
        header (may be empty); `body` usually holds `{"errorType", "errorMessage", ...}` (see `error_summary`)."""

    def on_init_error(self, error_type: str, body: bytes) -> None:
        """Init failed (`POST /runtime/init/error`); the runtime exits after this."""

    def on_protocol_error(self, reason: str) -> None:
        """The runtime broke the protocol (junk, oversized request, unknown request id, a second held
        `GET /next`, ...). Called once; the endpoint has closed every connection and serves no more."""


class RuntimeEndpoint:
    """The Runtime API for one environment, on its own loopback port, driven by `loop`.

    Use: `address = endpoint.listen()` → start the process with `AWS_LAMBDA_RUNTIME_API=address` → wait
    for `on_next` (init done) → `deliver(...)` → `on_response`/`on_error` → `on_next` (freeze now) → ...
    → `close()`. At most one invocation is outstanding at a time, as in Lambda.
    """

    def __init__(self, loop: Loop, listener: RuntimeListener, *, function_arn: str,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self._loop = loop
        self._listener = listener
        self.function_arn = function_arn
        self.max_body = max_body
        self._sock: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._held: _Client | None = None  # the connection whose GET /next is waiting for an invocation
        self._queued: _Invocation | None = None  # delivered before any GET /next was waiting
        self._current: str | None = None  # request id delivered and not yet answered
        self._initialised = False
        self._closed = False
        #: Why the endpoint stopped serving (the protocol error), or None.
        self.failed: str | None = None
        self.address = ""

    # -- the supervisor's side -------------------------------------------------------------------------
    def listen(self) -> str:
        """Bind 127.0.0.1 on a free port and start accepting; returns `"127.0.0.1:<port>"`, the value of
        `AWS_LAMBDA_RUNTIME_API` for the environment's process."""
        if self._sock is not None or self._closed:
            raise RuntimeError("RuntimeEndpoint.listen() called twice or after close()")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(MAX_CONNECTIONS)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock, self._accept)
        host, port = sock.getsockname()
        self.address = f"{host}:{port}"
        return self.address

    @property
    def next_pending(self) -> bool:
        """A `GET /next` is held open right now, with no invocation for it yet: the runtime is idle and
        may be frozen."""
        return self._held is not None and self._current is None

    @property
    def initialised(self) -> bool:
        """The runtime has asked for its first invocation (init is over)."""
        return self._initialised

    @property
    def current_request(self) -> str | None:
        """The request id delivered (sent, or queued for the next `GET /next`) and not answered yet."""
        if self._current is not None:
            return self._current
        return self._queued.request_id if self._queued is not None else None

    def deliver(self, request_id: str, payload: bytes, deadline_ms: int, trace_id: str = "", *,
                client_context: str = "", cognito_identity: str = "") -> None:
        """Hand an invocation to the runtime: answer the held `GET /next`, or the next one to arrive.

        `deadline_ms` is the function deadline in Unix epoch milliseconds (`Lambda-Runtime-Deadline-Ms`,
        see `deadline_ms`); `trace_id`, `client_context` and `cognito_identity` become their headers when
        not empty. Raises RuntimeError when an invocation is outstanding or the endpoint is closed: both
        are the caller's bugs.
        """
        if self._closed or self.failed is not None:
            raise RuntimeError(f"deliver({request_id!r}) on a closed Runtime API endpoint ({self.failed or 'closed'})")
        outstanding = self.current_request
        if outstanding is not None:
            raise RuntimeError(f"deliver({request_id!r}) while invocation {outstanding!r} is outstanding")
        for name, value in (("request_id", request_id), ("trace_id", trace_id), ("client_context", client_context),
                            ("cognito_identity", cognito_identity)):
            if not _HEADER_VALUE.fullmatch(value) or (name == "request_id" and not value):
                raise ValueError(f"deliver: {name}={value!r} cannot be sent as an HTTP header value")
        invocation = _Invocation(request_id, payload, deadline_ms, trace_id, client_context, cognito_identity)
        held, self._held = self._held, None
        if held is not None:
            self._current = request_id
            self._send_invocation(held, invocation)
        else:
            self._queued = invocation

    def close(self) -> None:
        """Stop listening, close every client connection and leave the loop. Idempotent; no listener call
        follows."""
        if self._closed:
            return
        self._closed = True
        self._shut()

    def _shut(self) -> None:
        """Stop listening and close every connection."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._sock.close()
        for client in list(self._clients.values()):
            self._drop(client)
        self._held = self._queued = None

    # -- connections -----------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: the runtime retries; the supervisor's own limits are not ours to fix
            if self._closed or self.failed is not None:
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset before we got to it
                sock.close()
                continue
            client = _Client(sock)
            self._clients[sock.fileno()] = client
            self._loop.add_reader(sock, lambda c=client: self._on_readable(c))
            if len(self._clients) > MAX_CONNECTIONS:
                self._protocol_error(client, f"more than {MAX_CONNECTIONS} connections open at once")
                return

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._on_eof(client)
            return
        client.conn.receive_data(data)
        self._process(client)

    def _on_eof(self, client: _Client) -> None:
        # A runtime that exits (or crashes) closes its connections; that is the supervisor's to notice
        # through the process exit, not a protocol error, even in the middle of a request.
        try:
            client.conn.receive_data(b"")
        except RuntimeError:
            pass
        if client.conn.their_state is h11.IDLE or client is self._held:
            self._drop(client)
            return
        self._process(client, eof=True)
        if client.sock.fileno() >= 0 and not client.out:
            self._drop(client)

    def _process(self, client: _Client, eof: bool = False) -> None:
        """Turn the bytes received on `client` into requests, while it is not waiting for our answer."""
        conn = client.conn
        while client.sock.fileno() >= 0 and not self._closed and self.failed is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if eof:  # the peer went away mid-request
                    self._drop(client)
                else:
                    self._protocol_error(client, f"malformed HTTP request: {exc}", 400, "InvalidRequest")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # Waiting for our answer (a held GET /next). Whatever the runtime sends meanwhile stays in
                # h11's buffer; bound it.
                if len(conn.trailing_data[0]) > MAX_HEADER_BYTES + self.max_body:
                    self._protocol_error(client, "sent more than a request's worth of data while its "
                                         "previous request was unanswered")
                return
            if isinstance(event, h11.Request):
                self._on_request(client, event)
            elif isinstance(event, h11.Data):
                client.body_bytes += len(event.data)
                if client.body_bytes > self.max_body:
                    self._too_large(client)
                    return
                if client.keep_body:
                    client.body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._on_complete(client)
            elif isinstance(event, h11.ConnectionClosed):
                self._drop(client)
                return

    # -- requests --------------------------------------------------------------------------------------
    def _on_request(self, client: _Client, request: h11.Request) -> None:
        client.reset_request()
        length = _content_length(request)
        if length is not None and length > self.max_body:
            self._too_large(client)
            return
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").partition("?")[0]
        route = _route(path)
        if route is None:
            client.pending = ("not_found", "", "")
            return
        kind, request_id = route
        if method != ("GET" if kind == "next" else "POST"):
            client.pending = ("method_not_allowed", "", "")
            return
        error_type = ""
        if kind in ("error", "init_error"):
            error_type = _header(request, ERROR_TYPE_HEADER.lower().encode())[:MAX_ERROR_TYPE_CHARS]
        client.keep_body = kind != "next"
        client.pending = (kind, request_id, error_type)
        if client.conn.they_are_waiting_for_100_continue:
            # curl sends `Expect: 100-continue` with bodies over 1 KiB and waits a second for this.
            self._send(client, h11.InformationalResponse(status_code=100, headers=[]))

    def _on_complete(self, client: _Client) -> None:
        kind, request_id, error_type = client.pending
        body = b"".join(client.body)
        client.reset_request()
        if kind == "not_found":
            self._respond(client, 404, {"errorType": "NotFound", "errorMessage": "404 page not found"})
        elif kind == "method_not_allowed":
            self._respond(client, 405, {"errorType": "MethodNotAllowed", "errorMessage": "method not allowed"})
        elif kind == "next":
            self._on_next(client)
        elif kind in ("response", "error"):
            if request_id != self._current or self._current is None:
                expected = f"invocation {self._current!r}" if self._current else "no invocation in progress"
                self._protocol_error(client, f"{kind} for unknown request id {request_id!r} ({expected})",
                                     400, "InvalidRequestID", "Invalid request ID")
                return
            self._current = None
            self._respond(client, 202, {"status": "OK"})
            if kind == "response":
                self._listener.on_response(request_id, body)
            else:
                self._listener.on_error(request_id, error_type, body)
        elif kind == "init_error":
            if self._initialised:
                self._protocol_error(client, "init error posted after init had ended (after the first GET /next)",
                                     403, "InvalidStateTransition")
                return
            self._respond(client, 202, {"status": "OK"})
            self._listener.on_init_error(error_type, body)

    def _on_next(self, client: _Client) -> None:
        if self._held is not None:
            self._protocol_error(client, "a second GET /next while one is already waiting", 403,
                                 "InvalidStateTransition")
            return
        if self._current is not None:
            self._protocol_error(client, f"GET /next before answering invocation {self._current!r}", 403,
                                 "InvalidStateTransition")
            return
        self._held = client
        self._initialised = True
        self._listener.on_next()
        # An invocation delivered before the runtime asked is answered now, after the listener has seen
        # this GET /next like any other (the first one ends init).
        queued = self._queued
        if queued is not None and self._held is client and not self._closed:
            self._queued = self._held = None
            self._current = queued.request_id
            self._send_invocation(client, queued)

    # -- answers ---------------------------------------------------------------------------------------
    def _send_invocation(self, client: _Client, inv: _Invocation) -> None:
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(inv.payload))),
            ("Lambda-Runtime-Aws-Request-Id", inv.request_id),
            ("Lambda-Runtime-Deadline-Ms", str(int(inv.deadline_ms))),
            ("Lambda-Runtime-Invoked-Function-Arn", self.function_arn),
        ]
        for name, value in (("Lambda-Runtime-Trace-Id", inv.trace_id),
                            ("Lambda-Runtime-Client-Context", inv.client_context),
                            ("Lambda-Runtime-Cognito-Identity", inv.cognito_identity)):
            if value:
                headers.append((name, value))
        self._send(client, h11.Response(status_code=200, headers=headers), h11.Data(data=inv.payload),
                   h11.EndOfMessage())

    def _respond(self, client: _Client, status: int, document: dict) -> None:
        body = json.dumps(document).encode()
        self._send(client, h11.Response(status_code=status, headers=[("Content-Type", "application/json"),
                                                                      ("Content-Length", str(len(body)))]),
                   h11.Data(data=body), h11.EndOfMessage())

    def _send(self, client: _Client, *events: h11.Event) -> None:
        conn = client.conn
        try:
            client.out += b"".join(conn.send(event) or b"" for event in events)
        except h11.LocalProtocolError:
            self._drop(client)  # the connection is in no state for an answer (e.g. already errored)
            return
        self._flush(client)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            if conn.trailing_data[0]:
                # A pipelined request: handle it from the loop, not inside the caller (deliver may be
                # called by the listener, which should not be re-entered).
                self._loop.call_later(0, self._process, client)
        elif conn.our_state in (h11.MUST_CLOSE, h11.CLOSED) and not client.out:
            self._drop(client)

    def _flush(self, client: _Client) -> None:
        sock = client.sock
        while client.out:
            try:
                sent = sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return
            del client.out[:sent]
        if client.out:
            if not client.writing:
                client.writing = True
                self._loop.add_writer(sock, lambda c=client: self._flush(c))
        else:
            if client.writing:
                client.writing = False
                self._loop.remove_writer(sock)
            if client.conn.our_state in (h11.MUST_CLOSE, h11.CLOSED):
                self._drop(client)

    def _too_large(self, client: _Client) -> None:
        self._protocol_error(client, f"request body over {self.max_body} bytes", 413, "RequestEntityTooLarge",
                             f"Exceeded maximum allowed payload size ({self.max_body} bytes).")

    def _protocol_error(self, client: _Client, reason: str, status: int | None = None, error_type: str = "",
                        message: str = "") -> None:
        """Answer `client` if its state allows (best effort, no waiting), close every connection, stop
        serving, and tell the listener once."""
        if self.failed is not None or self._closed:
            self._drop(client)
            return
        self.failed = reason
        if status is not None:
            body = json.dumps({"errorType": error_type, "errorMessage": message or reason}).encode()
            try:
                data = client.conn.send(h11.Response(status_code=status, headers=[
                    ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("Connection", "close")]))
                data += client.conn.send(h11.Data(data=body)) or b""
                client.sock.send(bytes(client.out) + (data or b""))
            except (h11.LocalProtocolError, OSError):
                pass
        self._shut()
        self._listener.on_protocol_error(reason)

    def _drop(self, client: _Client) -> None:
        sock = client.sock
        if sock.fileno() < 0:
            return
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._clients.pop(sock.fileno(), None)
        if self._held is client:
            self._held = None
        sock.close()


class _Client:
    """One connection from the runtime: its HTTP state, the request being read, and unsent bytes."""

    __slots__ = ("sock", "conn", "out", "writing", "pending", "body", "body_bytes", "keep_body")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.out = bytearray()
        self.writing = False
        self.reset_request()

    def reset_request(self) -> None:
        self.pending: tuple[str, str, str] = ("not_found", "", "")
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.keep_body = False


class _Invocation:
    __slots__ = ("request_id", "payload", "deadline_ms", "trace_id", "client_context", "cognito_identity")

    def __init__(self, request_id: str, payload: bytes, deadline_ms: int, trace_id: str, client_context: str,
                 cognito_identity: str) -> None:
        self.request_id = request_id
        self.payload = payload
        self.deadline_ms = deadline_ms
        self.trace_id = trace_id
        self.client_context = client_context
        self.cognito_identity = cognito_identity


def _route(path: str) -> tuple[str, str] | None:
    """(kind, request id) for a Runtime API path, or None: next, response, error, init_error."""
    if not path.startswith(_PREFIX):
        return None
    rest = path[len(_PREFIX):]
    if rest == "invocation/next":
        return "next", ""
    if rest == "init/error":
        return "init_error", ""
    parts = rest.split("/")
    if len(parts) == 3 and parts[0] == "invocation" and parts[1] and parts[2] in ("response", "error"):
        return parts[2], urllib.parse.unquote(parts[1])
    return None


def _header(request: h11.Request, name: bytes) -> str:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return ""


def _content_length(request: h11.Request) -> int | None:
    value = _header(request, b"content-length")
    return int(value) if value.isdigit() else None  # h11 has already rejected a malformed one


def deadline_ms(remaining_s: float) -> int:
    """`Lambda-Runtime-Deadline-Ms` for a deadline `remaining_s` seconds from now: Unix epoch milliseconds
    (runtimes compute `getRemainingTimeInMillis()` as this minus their wall clock)."""
    return int((time.time() + remaining_s) * 1000)


def function_arn(function_name: str) -> str:
    """The `Lambda-Runtime-Invoked-Function-Arn` of a local function (the same ARN Python handlers see)."""
    return f"arn:aws:lambda:local:000000000000:function:{function_name}"


def error_summary(body: bytes, limit: int = 1000) -> tuple[str, str]:
    """(errorType, errorMessage) from an error body a runtime posted, for records and logs.

    Runtimes post `{"errorType": ..., "errorMessage": ..., "trace"/"stackTrace": [...]}`; anything else
    (not JSON, not an object, odd types) gives ("", the body's first `limit` characters)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        document = None
    if isinstance(document, dict):
        error_type, message = document.get("errorType"), document.get("errorMessage")
        if isinstance(error_type, str) or isinstance(message, str):
            return ((error_type if isinstance(error_type, str) else "")[:MAX_ERROR_TYPE_CHARS],
                    (message if isinstance(message, str) else "")[:limit])
    return "", body[:limit].decode("utf-8", "replace")
