"""Connection limits uvicorn does not have: header, body and idle timeouts, and a bound on open connections.

uvicorn (h11) closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but holds a
connection that never sends a request, or sends its headers or body a byte at a time, for as long as the client
likes; and it counts connections only to answer 503 once a request has been read (`limit_concurrency`). This
protocol, uvicorn's own h11 one with three timers added, closes:
  - a connection that sends nothing for `timeout_idle` seconds (before its first request, and between requests);
  - a request whose headers are not complete `timeout_header` seconds after its first byte: 408, then closed;
  - a request whose body is not complete `timeout_body` seconds after its headers: 408 if no response has started
    (the handler reading it sees a disconnect), then closed;
and answers a connection over `max_connections` with a 503 at once, before reading anything from it. All of it runs
on the event loop's timers: nothing waits for a slow client, so other requests (and /health) are not delayed.
"""

import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    timeout_header: float = 10.0
    timeout_body: float = 30.0
    timeout_idle: float = 5.0
    max_connections: int = 256

    def __post_init__(self):
        for name in ("timeout_header", "timeout_body", "timeout_idle"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")


def raw_response(status: int, reason: str, message: str, kind: str, headers: str = "") -> bytes:
    """A whole HTTP/1.1 response with an OpenAI-format error body, for answers written below h11."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{headers}connection: close\r\n\r\n")
    return head.encode() + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with `limits` enforced (see the module docstring)."""

    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:
        self._timer = None
        self._timing = None  # "idle", "header" or "body": what the timer bounds
        self.refused = len(self.connections) >= self.limits.max_connections
        if self.refused:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm("idle", self.limits.timeout_idle)

    def _refuse(self, transport) -> None:
        self.transport = transport  # (connection_lost closes it)
        message = (f"the server has {len(self.connections)} open connections, its limit "
                   "(--max-connections); retry shortly")
        transport.write(raw_response(503, "Service Unavailable", message, "server_error", "retry-after: 1\r\n"))
        # half-close: the client reads the 503 and our FIN; its request bytes, if any, land on an open socket
        # (closing at once could answer them with a reset that discards the 503 unread)
        transport.write_eof()
        self.loop.call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.conn.their_state is h11.IDLE and self._timing != "header":
            self._arm("header", self.limits.timeout_header)  # the first bytes of a request
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._timing != "body":
                self._arm("body", self.limits.timeout_body)
        elif state is not h11.IDLE or self._timing == "body":
            self._disarm()  # the headers (and body) are complete: the handler's turn
        # (between requests, uvicorn's keep-alive timer, set to timeout_idle, closes an idle connection)

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._timing = what
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timing = None

    def _expired(self) -> None:
        what, self._timer, self._timing = self._timing, None, None
        if self.transport.is_closing():
            return
        if what == "header":
            self.transport.write(raw_response(408, "Request Timeout", "the request's headers did not arrive "
                                              f"within {self.limits.timeout_header:g} s", "invalid_request_error"))
        elif what == "body" and self.cycle is not None and not self.cycle.response_started:
            self.transport.write(raw_response(408, "Request Timeout", "the request's body did not arrive "
                                              f"within {self.limits.timeout_body:g} s", "invalid_request_error"))
        if self.cycle is not None and not self.cycle.response_complete:
            # the handler waiting for the body sees a disconnect, and its own answer is dropped
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self.refused:
            return
        super().connection_lost(exc)


def protocol_class(limits: ConnectionLimits) -> type:
    """The protocol with these limits (pass it as uvicorn.Config(http=...))."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})
