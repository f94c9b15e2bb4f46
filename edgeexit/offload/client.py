"""The board's side of offloading: a deadline-bound HTTP/1.1 client and the policy that decides per input.

Standard library and numpy only (no HTTP package on the board). One keep-alive connection to the server; each
request has one deadline for everything (connect, TLS handshake, send, headers, body): every blocking socket call
waits at most the time left, so a slow or trickling server costs an input at most ``timeout_s`` before it
finishes locally. Answers are read up to a fixed size (a huge body is cut off, never buffered whole).

:class:`OffloadPolicy` offloads an input only when the round trip it expects (an exponentially weighted moving
average of measured ones) is below the local cost of the remaining stages times ``1 + margin``; after
``failures_to_pause`` failures in a row it stops trying for ``pause_s`` (doubling up to ``max_pause_s``), so a
dead server does not add its timeout to every input.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from .protocol import ProtocolError, RemoteAnswer, decode_answer, encode_request, offloadable

log = logging.getLogger(__name__)

#: The most header bytes read from an answer.
MAX_HEADER_BYTES = 16 * 1024


class OffloadFailure(Exception):
    """One offload attempt failed; the message (one line) says why. The input then finishes locally."""


class OffloadClient:
    """Posts hand-offs to one KServe v2 tail model, one request at a time, under a deadline.

    Args:
        url: the server, ``http://host:port`` or ``https://host:port`` (a path prefix is kept).
        model: the tail model's name (:func:`~edgeexit.offload.protocol.tail_model_name`).
        token: a bearer token sent as ``Authorization: Bearer ...``, or None.
        timeout_s: the deadline of one request, everything included.
        ca_file: CA certificates (PEM) that an https server's certificate must chain to; None = the system's.
        cert_file, key_file: this board's client certificate (PEM) and its private key (None: in ``cert_file``),
            for a server that requires client certificates (mTLS: ``edgeexit serve --tls-client-ca``).
        max_answer_bytes: answers longer than this are refused without reading them whole.
    """

    def __init__(self, url: str, model: str, *, token: str | None = None, timeout_s: float = 0.25,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 max_answer_bytes: int = 64 * 1024):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"offload URL {url!r} is not http://HOST:PORT or https://HOST:PORT")
        if not 0 < timeout_s <= 60:
            raise UsageError(f"offload timeout {timeout_s} s is outside (0, 60]")
        if token is not None and (not token or any(c in token for c in "\r\n")):
            raise UsageError("the offload token is empty or has a line break; give the token alone")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UsageError(f"offload URL {url!r} has a bad port") from None
        self.host, self.port, self.tls = parts.hostname, port, parts.scheme == "https"
        self.path = f"{parts.path.rstrip('/')}/v2/models/{model}/infer"
        self.timeout_s, self.max_answer_bytes = timeout_s, max_answer_bytes
        if (cert_file is not None or key_file is not None) and not self.tls:
            raise UsageError(f"a client certificate is for https servers; offload URL {url!r} is plain http")
        if key_file is not None and cert_file is None:
            raise UsageError("offload_key needs offload_cert (the client certificate it belongs to)")
        self._ssl = _tls_context(ca_file, cert_file, key_file) if self.tls else None
        self.client_cert = cert_file is not None
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{port}", "Content-Type: application/json",
                "Accept: application/json"]
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        self._head = "\r\n".join(head)
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._count = 0
        self._handshaken = False

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock, self._buffer = None, b""

    def infer(self, handoff: np.ndarray, fingerprint: str, rule_json: str, num_classes: int, first_exit: int,
              last_exit: int, logits_dtype: str) -> RemoteAnswer:
        """One round trip; OffloadFailure (one line) for every way it can go wrong."""
        deadline = time.monotonic() + self.timeout_s
        self._count += 1
        body = encode_request(handoff, fingerprint, rule_json, str(self._count))
        request = f"{self._head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        fresh = self._sock is None
        self._handshaken = False
        try:
            try:
                status, answer, keep = self._exchange(request, deadline)
            except (ConnectionError, _Closed) if not fresh else ():
                # the kept connection was closed by the server meanwhile: once more on a new one
                self.close()
                status, answer, keep = self._exchange(request, deadline)
        except OffloadFailure:
            self.close()
            raise
        except socket.timeout:
            self.close()
            raise OffloadFailure(f"no answer within the deadline ({1000 * self.timeout_s:.0f} ms)") from None
        except ssl.SSLError as exc:
            self.close()
            if self._handshaken and isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise OffloadFailure(_closed_after_handshake(self.client_cert)) from None
            raise OffloadFailure(_tls_failure(exc, self.client_cert)) from None
        except (OSError, _Closed) as exc:
            self.close()
            if self._handshaken:
                raise OffloadFailure(_closed_after_handshake(self.client_cert, exc)) from None
            raise OffloadFailure(f"server unreachable: {_oserror(exc)}") from None
        if not keep:
            self.close()
        if status != 200:
            raise OffloadFailure(f"HTTP {status}: {_error_text(answer)}")
        try:
            return decode_answer(answer, num_classes, first_exit, last_exit, logits_dtype)
        except ProtocolError as exc:
            raise OffloadFailure(f"bad answer: {exc}") from None

    # ---- one request/response on the kept connection ---------------------------------------------------------
    def _exchange(self, request: bytes, deadline: float) -> tuple[int, bytes, bool]:
        sock = self._connect(deadline)
        self._timeout(sock, deadline)
        sock.sendall(request)
        head = self._read_until(sock, b"\r\n\r\n", MAX_HEADER_BYTES, deadline)
        status, headers = _parse_head(head)
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            raise OffloadFailure(f"answer uses transfer-encoding {headers['transfer-encoding'][:30]!r}; expected a "
                                 "Content-Length")
        length = headers.get("content-length")
        keep = headers.get("connection", "").lower() != "close"
        if length is None:  # read to the end of the connection
            return status, self._read_all(sock, deadline), False
        if not length.isdigit():
            raise OffloadFailure(f"answer's Content-Length {length[:30]!r} is not a number")
        if int(length) > self.max_answer_bytes:
            raise OffloadFailure(f"answer of {int(length)} bytes exceeds the limit of {self.max_answer_bytes}")
        return status, self._read_exactly(sock, int(length), deadline), keep

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=_left(deadline, self.timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                self._timeout(sock, deadline)
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
                self._handshaken = True
            self._sock, self._buffer = sock, b""
        return self._sock

    def _timeout(self, sock: socket.socket, deadline: float) -> None:
        sock.settimeout(_left(deadline, self.timeout_s))

    def _recv(self, sock: socket.socket, deadline: float) -> bytes:
        self._timeout(sock, deadline)
        chunk = sock.recv(65536)
        if not chunk:
            raise _Closed("the server closed the connection")
        return chunk

    def _read_until(self, sock: socket.socket, marker: bytes, limit: int, deadline: float) -> bytes:
        while marker not in self._buffer:
            if len(self._buffer) > limit:
                raise OffloadFailure(f"answer headers exceed {limit} bytes")
            self._buffer += self._recv(sock, deadline)
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _read_exactly(self, sock: socket.socket, n: int, deadline: float) -> bytes:
        while len(self._buffer) < n:
            self._buffer += self._recv(sock, deadline)
        body, self._buffer = self._buffer[:n], self._buffer[n:]
        return body

    def _read_all(self, sock: socket.socket, deadline: float) -> bytes:
        while True:
            if len(self._buffer) > self.max_answer_bytes:
                raise OffloadFailure(f"answer exceeds the limit of {self.max_answer_bytes} bytes")
            try:
                self._buffer += self._recv(sock, deadline)
            except _Closed:
                body, self._buffer = self._buffer, b""
                return body


def _tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The client's TLS context: the server checked against ``ca_file`` (or the system's CAs), and this board's
    certificate offered when it has one; UsageError (one line) when a file cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"offload CA file {ca_file}: not PEM CA certificates ({_ssl_why(exc)})") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise UsageError(f"offload client certificate {cert_file}"
                             f"{'' if key_file is None else f' with key {key_file}'}: not a PEM certificate with its "
                             f"private key ({_ssl_why(exc)})") from None
    return context


def _ssl_why(exc: BaseException) -> str:
    """Why a PEM file did not load, in a few words (OpenSSL's reason; "PEM lib" means no PEM block was found)."""
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return reason if reason and reason != "PEM lib" else "no PEM block of that kind in it"
    return _oserror(exc)


#: TLS alerts by which a server refuses the client's certificate (or its absence)
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                       "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED", "ACCESS_DENIED",
                       "HANDSHAKE_FAILURE")


def _closed_after_handshake(client_cert: bool, exc: BaseException | None = None) -> str:
    """One line for a TLS connection the server closed right after the handshake, before any answer. That is how
    a TLS 1.3 server (uvicorn's included) refuses a client certificate: it checks the certificate after the
    client's side of the handshake has completed, and closes the connection, often without its alert."""
    how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
    said = ("refused this board's client certificate (not signed by a CA it trusts?)" if client_cert
            else "requires a client certificate and this board has none (offload_cert / --offload-cert)")
    return f"TLS failure: the server {how} the connection after the handshake, before answering: it probably {said}"


def _tls_failure(exc: ssl.SSLError, client_cert: bool) -> str:
    """One line: the TLS error, and when the server's alert says so, that it refused the client certificate."""
    reason = str(getattr(exc, "reason", None) or exc)
    if "ALERT" in reason and any(a in reason for a in _CLIENT_CERT_ALERTS):
        said = ("this board's client certificate was refused" if client_cert
                else "a client certificate is required and this board has none (offload_cert / --offload-cert)")
        return f"TLS failure: the server refused the handshake ({reason}): {said}"
    return f"TLS failure: {reason}"


class _Closed(Exception):
    """The server closed the connection."""


def _left(deadline: float, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise OffloadFailure(f"no answer within the deadline ({1000 * timeout_s:.0f} ms)")
    return left


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise OffloadFailure(f"answer is not HTTP ({lines[0][:40]!r})")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _error_text(body: bytes) -> str:
    """The server's error message (KServe: {"error": "..."}), one line of at most 160 characters."""
    import json

    try:
        text = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError, UnicodeDecodeError):
        text = body[:160].decode("utf-8", "replace")
    text = " ".join(text.split())
    return (text[:157] + "...") if len(text) > 160 else (text or "no message")


def _oserror(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc) or type(exc).__name__


@dataclass
class OffloadPolicy:
    """Whether offloading the next undecided input pays, from what was measured so far.

    Offload when ``expected round trip < local cost of the remaining stages x (1 + margin)``; both are
    exponentially weighted moving averages (weight ``alpha`` for each new measurement). Before any round trip
    is measured the first undecided input goes to the server (that measures one); ``always`` sends every one.
    While the expected round trip is too slow, one input in ``probe_every_s`` seconds is sent anyway, so that a
    server that became fast again is noticed (that input may pay up to the deadline more than locally). After
    ``failures_to_pause`` failures in a row no input is sent for ``pause_s`` seconds; then one request tries
    again, and each further failure doubles the pause, up to ``max_pause_s``.
    """

    margin: float = 0.1
    #: send every undecided input regardless of the measured costs (back-off still applies): for tests, or where
    #: the board's energy matters more than its latency
    always: bool = False
    alpha: float = 0.2
    probe_every_s: float = 5.0
    failures_to_pause: int = 3
    pause_s: float = 5.0
    max_pause_s: float = 120.0
    #: expected round trip and local tail cost (ms); None before the first measurement
    round_trip_ms: float | None = None
    local_ms: float | None = None
    #: where the first local estimate came from
    local_from: str = "timed when the Runner was created"
    failures: int = 0
    paused_until: float = 0.0
    last_error: str | None = None
    _last_sent: float = field(default=float("-inf"), repr=False)
    _pause: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.margin <= 10 or not 0 < self.alpha <= 1 or self.failures_to_pause < 1:
            raise UsageError(f"offload policy: margin {self.margin} must be in [0, 10], alpha {self.alpha} in (0, 1], "
                             f"failures_to_pause {self.failures_to_pause} >= 1")

    def choose(self, now: float) -> tuple[bool, str | None]:
        """(send this input?, why not when it is because of failures)."""
        if now < self.paused_until:
            return False, (f"offload paused for {self.paused_until - now:.1f} s more after {self.failures} failures "
                           f"in a row (last: {self.last_error})")
        if self.failures >= self.failures_to_pause:  # the pause is over: one request says whether it is back
            self._last_sent = now
            return True, None
        if self.always or self.round_trip_ms is None or self.local_ms is None or \
                self.round_trip_ms < self.local_ms * (1 + self.margin) or now - self._last_sent >= self.probe_every_s:
            self._last_sent = now
            return True, None
        return False, None

    def succeeded(self, round_trip_ms: float) -> None:
        self.round_trip_ms = _ewma(self.round_trip_ms, round_trip_ms, self.alpha)
        self.failures, self._pause, self.last_error = 0, 0.0, None

    def failed(self, reason: str, now: float) -> None:
        self.failures += 1
        self.last_error = reason
        if self.failures >= self.failures_to_pause:
            self._pause = min(self.max_pause_s, self._pause * 2 if self._pause else self.pause_s)
            self.paused_until = now + self._pause
            log.warning("offload: %d failures in a row (last: %s); finishing inputs locally for %.0f s",
                        self.failures, reason, self._pause)

    def ran_locally(self, local_ms: float) -> None:
        self.local_ms = _ewma(self.local_ms, local_ms, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "round_trip_ms": self.round_trip_ms, "local_ms": self.local_ms,
                "local_from": self.local_from,
                "failures": self.failures, "last_error": self.last_error}


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class OffloadLink:
    """A Runner's connection to its tail: the client, the policy and what every request carries.

    ``ask(features)`` returns ``(answer, error, round_trip_ms)``: the server's answer, or None with the reason
    (None when the policy chose local because it is faster); counters ``sent``, ``answered`` and ``failures``.
    """

    def __init__(self, client: OffloadClient, policy: OffloadPolicy, after: int, last_exit: int, fingerprint: str,
                 num_classes: int, logits_dtype: str):
        self.client, self.policy, self.after, self.last_exit = client, policy, after, last_exit
        self.fingerprint, self.num_classes, self.logits_dtype = fingerprint, num_classes, logits_dtype
        self.rule_json = ""
        self.sent = self.answered = self.failures = 0

    def set_rule(self, spec: dict[str, Any]) -> None:
        """The exit rule the tail decides with (an ExitRuleSpec's dict); UsageError for rules with state."""
        import json

        why = offloadable(spec)
        if why is not None:
            raise UsageError(f"cannot offload with this exit rule: {why}")
        self.rule_json = json.dumps(spec, sort_keys=True)

    def ask(self, features: np.ndarray) -> tuple[RemoteAnswer | None, str | None, float | None]:
        send, why = self.policy.choose(time.monotonic())
        if not send:
            return None, why, None
        self.sent += 1
        t0 = time.perf_counter()
        try:
            answer = self.client.infer(features, self.fingerprint, self.rule_json, self.num_classes, self.after + 1,
                                       self.last_exit, self.logits_dtype)
        except Exception as exc:  # noqa: BLE001 - whatever a server does, the input finishes locally and says why
            known = isinstance(exc, OffloadFailure)
            reason = str(exc) if known else f"unexpected failure ({type(exc).__name__}: {exc})"
            if not known:
                log.debug("offload: unexpected failure", exc_info=True)
                self.client.close()
            self.failures += 1
            self.policy.failed(reason, time.monotonic())
            return None, reason, None
        round_trip = (time.perf_counter() - t0) * 1e3
        self.answered += 1
        self.policy.succeeded(round_trip)
        return answer, None, round_trip

    def to_dict(self) -> dict[str, Any]:
        return {"after": self.after, "sent": self.sent, "answered": self.answered, "failures": self.failures,
                "policy": self.policy.to_dict()}
