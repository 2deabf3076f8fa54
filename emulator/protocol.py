"""The channel between the supervisor and a Python environment: what each side may say, and how.

One SOCK_SEQPACKET socket per environment, one message per datagram (no framing).

supervisor → environment   ("invoke", request_id, event, remaining_ms)          marshal (trusted direction)
environment → supervisor   ("ready", init_ms)                                    JSON (untrusted direction)
                           ("init_error", fatal, error_kind, error_type, message)
                           ("result", request_id, status, error_kind, error_type, message, duration_ms)
                           ("oom", rss_mb)
                           ("absorbed", error_kind)  a library logged a database error it handled
                                                     itself (a pool's background connection attempt
                                                     refused), so it never reached the handler

The environment runs user code, so what comes back is checked before it is believed: size (a datagram
larger than `MAX_MESSAGE` is cut by the kernel and rejected, never parsed), encoding (JSON, a parser that is
safe on hostile bytes; `marshal` is documented as unsafe on malicious data), shape (a known kind, the
right number of fields of the right types) and vocabulary (statuses and error kinds from `errors.py`,
texts cut to `TEXT_LIMIT`). A message that fails any check raises `ProtocolError`, which costs that
environment only. The environment side cuts its own texts before sending, so a legitimate message never
comes near the limit however long an exception's name or message is.
"""

from __future__ import annotations

import json
import marshal
import math
import socket
from typing import Any

from .errors import ERROR_KINDS

#: Largest datagram either side sends or accepts.
MAX_MESSAGE = 1 << 16
#: Longest text (error type or message) in a message; the full traceback is in the environment's log.
TEXT_LIMIT = 2000
#: Statuses an environment may report for an invocation (the supervisor decides timeouts and crashes).
REPORTED_STATUSES = ("ok", "handler_error")
_KINDS = frozenset(ERROR_KINDS) | {""}


class ProtocolError(Exception):
    """An environment sent something that is not a valid message; the text says what was wrong."""


# --- environment side ---------------------------------------------------------------------------------


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text` cut to `limit` characters (with a marker), so a message always fits in one datagram."""
    return text if len(text) <= limit else text[: limit - 15] + "… [truncated]"


def send_report(sock: socket.socket, message: tuple) -> None:
    """Send a message from the environment to the supervisor (texts must already be clipped)."""
    sock.send(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace"))


def receive_invoke(sock: socket.socket) -> tuple | None:
    """The next invoke message, or None when the supervisor closed the channel."""
    data = sock.recv(MAX_MESSAGE)
    return marshal.loads(data) if data else None


# --- supervisor side ----------------------------------------------------------------------------------


def encode_invoke(request_id: str, event: Any, remaining_ms: float) -> bytes:
    """The invoke message for an environment."""
    return marshal.dumps(("invoke", request_id, event, remaining_ms))


def read_report(sock: socket.socket) -> tuple | None:
    """Receive one message from an environment and check it. Returns None on EOF (the process closed its
    end or died); raises ProtocolError for anything that is not a valid message."""
    data, _, flags, _ = sock.recvmsg(MAX_MESSAGE)
    if flags & _MSG_TRUNC:
        raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
    return decode_report(data) if data else None


#: As a plain int: the enum's `&` costs more than the rest of reading a message.
_MSG_TRUNC = int(socket.MSG_TRUNC)


def decode_report(data: bytes) -> tuple:
    """Check and decode one message from an environment (see the module docstring)."""
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"not a message ({len(data)} bytes that are not UTF-8 JSON)") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ProtocolError("not a message (expected a list starting with its kind)")
    kind = message[0]
    if kind == "result" and len(message) == 7:
        # The message of every invocation, checked inline (the same checks as its shape below).
        _, request_id, status, error_kind, error_type, text, duration = message
        if (type(request_id) is str and len(request_id) <= 64 and status in REPORTED_STATUSES
                and error_kind in _KINDS and type(error_type) is str and len(error_type) <= TEXT_LIMIT
                and type(text) is str and len(text) <= TEXT_LIMIT and type(duration) in (int, float)
                and 0 <= duration < math.inf):
            return tuple(message)
    shape = _SHAPES.get(kind)
    if shape is None:
        raise ProtocolError(f"unknown message kind {clip(kind, 40)!r}")
    if len(message) != len(shape) + 1:
        raise ProtocolError(f"{kind!r} message with {len(message) - 1} fields, expected {len(shape)}")
    for value, (name, check) in zip(message[1:], shape):
        if not check(value):
            raise ProtocolError(f"{kind!r} message: bad {name} {clip(repr(value), 60)}")
    return tuple(message)


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= TEXT_LIMIT


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


_SHAPES: dict[str, tuple[tuple[str, Any], ...]] = {
    "ready": (("init_ms", _number),),
    "init_error": (("fatal", lambda v: isinstance(v, bool)), ("error_kind", lambda v: v in _KINDS),
                   ("error_type", _text), ("message", _text)),
    "result": (("request_id", lambda v: isinstance(v, str) and len(v) <= 64),
               ("status", lambda v: v in REPORTED_STATUSES), ("error_kind", lambda v: v in _KINDS),
               ("error_type", _text), ("message", _text), ("duration_ms", _number)),
    "oom": (("rss_mb", _number),),
    "absorbed": (("error_kind", lambda v: v in _KINDS and v),),
}
