"""The offload server: a bundle's stages after K as a KServe v2 model, hosted by KServe's Python model server.

Imported only by ``edgeexit serve`` (it needs the ``server`` extra: kserve). The tail runs on a Runner of the
verified bundle (:meth:`~edgeexit.runtime.runner.Runner.continue_from`), the bundle's own stage files and exit
rules, so a remote answer equals the local one bit for bit. The caller (the CLI) builds the Runner and the rule
reader; this module only speaks the protocol (:mod:`edgeexit.offload.protocol`).

With ``max_batch_size`` above 1, requests from different boards are batched (:mod:`edgeexit.offload.batching`):
the tail runs on one worker thread, a batch of queued inputs per call, while the event loop goes on with the
other requests' HTTP and JSON. With 1 (the default) each request runs the tail on the event loop itself.

In front of KServe's REST application sits a small ASGI guard: with a token, every request except the health
probes must carry ``Authorization: Bearer <token>`` (compared in constant time), and request bodies are refused
beyond a size fitted to the hand-off (413), before anything parses them. With a client CA, uvicorn's TLS requires
and verifies a client certificate signed by it (mTLS) before any request is read.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
import sys
import json
import logging
from collections import OrderedDict
from typing import Any, Callable

import kserve
import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from ..errors import EdgeExitError
from .batching import Batcher
from .protocol import DATATYPES, INPUT_NAME, bundle_fingerprint, offloadable, tail_model_name

log = logging.getLogger(__name__)

#: Paths a load balancer may probe without the token (they say nothing about the model).
OPEN_PATHS = ("/", "/v2/health/live", "/v2/health/ready")
_RULE_CACHE = 32


class TailModel(kserve.Model):
    """Stages ``after + 1 ..`` of a bundle as a KServe model named :func:`tail_model_name` (bundle, K).

    Args:
        runner: a Runner of the bundle (no offload of its own).
        after: K, the stage whose hand-off the requests carry.
        make_rule: an ExitRuleSpec's dict -> an ExitRule (raises EdgeExitError when it is not a valid rule).
        inject_delay_ms: a benchmark aid: wait this long before answering each request (a slower network),
            without blocking other requests. 0 in real use.
        max_batch_size: 1: each request runs the tail on the event loop when it comes. Above 1: requests are
            queued and run in batches of up to this many on one worker thread (:class:`Batcher`).
        max_batch_latency_ms: how long a batch waits for more requests after its oldest one arrived.
    """

    def __init__(self, runner: Any, after: int, make_rule: Callable[[dict[str, Any]], Any],
                 inject_delay_ms: float = 0.0, max_batch_size: int = 1, max_batch_latency_ms: float = 0.0):
        super().__init__(tail_model_name(runner.manifest.name, after))
        manifest = runner.manifest
        features = manifest.stages[after].outputs["features"]
        self.runner, self.after, self.make_rule = runner, after, make_rule
        self.shape, self.datatype = list(features.shape), DATATYPES[features.dtype]
        self.logits_datatype = DATATYPES[manifest.stages[-1].outputs["logits"].dtype]
        self.fingerprint = bundle_fingerprint([s.sha256 for s in manifest.stages])
        self.delay_s = inject_delay_ms / 1000.0
        self._rules: OrderedDict[str, Any] = OrderedDict()
        self.batcher = (Batcher(self._run_batch, max_batch_size, max_batch_latency_ms / 1000.0)
                        if max_batch_size > 1 else None)
        self.ready = True

    def _run_batch(self, items: list[tuple[np.ndarray, Any]]) -> list[Any]:
        """The worker thread's call: each queued (hand-off, rule) through the tail, one outcome per item."""
        out: list[Any] = []
        for handoff, rule in items:
            try:
                out.append(self.runner.continue_from(self.after, handoff, rule))
            except EdgeExitError as exc:  # this request's rule does not fit the bundle; the others go on
                out.append(InvalidInput(f"cannot run the request: {exc}"))
        return out

    def stop(self) -> None:
        if self.batcher is not None:
            stats = self.batcher.stats()
            print(f"edgeexit serve: ran {stats['items']} requests in {stats['batches']} batches (mean "
                  f"{stats['mean'] or 0:.2f}, largest {stats['largest']})", file=sys.stderr, flush=True)
            self.batcher.close()
        super().stop()

    def get_input_types(self) -> list[dict[str, Any]]:
        """The model metadata's inputs (``GET /v2/models/<name>``)."""
        return [{"name": INPUT_NAME, "datatype": self.datatype, "shape": self.shape}]

    def get_output_types(self) -> list[dict[str, Any]]:
        k = self.runner.manifest.num_classes
        return [{"name": "label", "datatype": "INT64", "shape": [1]},
                {"name": "exit_index", "datatype": "INT32", "shape": [1]},
                {"name": "score", "datatype": "FP32", "shape": [1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [1, k]},
                {"name": "logits", "datatype": self.logits_datatype, "shape": [1, k]}]

    def _rule(self, text: Any) -> Any:
        if not isinstance(text, str) or len(text) > 4096:
            raise InvalidInput("parameter 'rule' must be the board's exit rule as a JSON string")
        rule = self._rules.get(text)
        if rule is None:
            try:
                spec = json.loads(text)
            except ValueError:
                raise InvalidInput("parameter 'rule' is not JSON") from None
            if not isinstance(spec, dict):
                raise InvalidInput("parameter 'rule' must be a JSON object (an exit rule)")
            why = offloadable(spec)
            if why is not None:
                raise InvalidInput(f"cannot run this exit rule on a tail: {why}")
            try:
                rule = self.make_rule(spec)
            except EdgeExitError as exc:
                raise InvalidInput(f"bad exit rule: {exc}") from None
            self._rules[text] = rule
            if len(self._rules) > _RULE_CACHE:
                self._rules.popitem(last=False)
        return rule

    def handoff(self, payload: InferRequest) -> np.ndarray:
        """The request's hand-off as an array of the stage's shape and dtype; InvalidInput (400) otherwise."""
        inputs = payload.inputs or []
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise InvalidInput(f"expected one input named {INPUT_NAME!r} (the stage-{self.after} hand-off), got "
                               f"{[str(i.name)[:40] for i in inputs][:4]}")
        x = inputs[0]
        if x.datatype != self.datatype or list(x.shape) != self.shape:
            raise InvalidInput(f"{INPUT_NAME} must be {self.datatype} {self.shape}, got {str(x.datatype)[:20]} "
                               f"{list(x.shape)[:8]}")
        try:
            return x.as_numpy()
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(f"{INPUT_NAME}'s data is not {int(np.prod(self.shape))} {self.datatype} values"
                               ) from None

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        params = payload.parameters or {}
        if params.get("bundle") != self.fingerprint:
            raise InvalidInput(f"this server hosts bundle {self.fingerprint}, the request is for "
                               f"{str(params.get('bundle'))[:20]!r}: serve the board's bundle")
        rule = self._rule(params.get("rule"))
        handoff = self.handoff(payload)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.batcher is not None:
            r = await self.batcher.submit((handoff, rule))
        else:
            try:
                r = self.runner.continue_from(self.after, handoff, rule)
            except EdgeExitError as exc:  # a rule that does not fit the bundle (threshold count, exit index)
                raise InvalidInput(f"cannot run the request: {exc}") from None
        k = len(r.probabilities)
        outputs = [_output("label", [1], "INT64", np.array([r.label], np.int64)),
                   _output("exit_index", [1], "INT32", np.array([r.exit_index], np.int32)),
                   _output("score", [1], "FP32", np.array([r.score], np.float32)),
                   _output("probabilities", [1, k], "FP32", r.probabilities.reshape(1, k)),
                   _output("logits", [1, k], self.logits_datatype, np.asarray(r._q).reshape(1, k))]
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


def _output(name: str, shape: list[int], datatype: str, values: np.ndarray) -> InferOutput:
    return InferOutput(name=name, shape=shape, datatype=datatype, data=values.ravel().tolist())


class Guard:
    """ASGI middleware: bearer token (constant-time compare) and a request body limit."""

    def __init__(self, app: Any, token: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = None if token is None else b"Bearer " + token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope.get("path") not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _reply(send, 401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        if scope.get("method") == "POST":
            length = headers.get(b"content-length", b"")
            if not length.isdigit():
                return await _reply(send, 411, "a Content-Length is required")
            if int(length) > self.max_body:
                return await _reply(send, 413, f"request of {int(length)} bytes exceeds the limit of {self.max_body}")
        return await self.app(scope, receive, send)


async def _reply(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def max_request_bytes(shape: list[int]) -> int:
    """The largest body a hand-off of ``shape`` needs: at most 7 characters a value ("-32768,"), plus 64 KiB."""
    return 7 * int(np.prod(shape)) + 64 * 1024


def serve(model: TailModel, host: str, port: int, token: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, tls_client_ca: str | None = None) -> None:
    """Host ``model`` with KServe's model server (REST only, one worker) on ``host:port`` until SIGINT/SIGTERM.
    With ``tls_client_ca`` (and TLS) every connection must present a client certificate signed by that CA."""
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    app.add_middleware(Guard, token=token, max_body=max_request_bytes(model.shape))
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    server.register_model(model)
    # ModelServer.start() listens on 0.0.0.0: the same single-worker start, with the host the user chose
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port,
                      workers=1, grace_period=5, ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    rest.config.host = host
    if tls_client_ca is not None:  # mTLS: uvicorn builds its SSL context from these when it starts
        rest.config.ssl_ca_certs, rest.config.ssl_cert_reqs = tls_client_ca, ssl.CERT_REQUIRED
    server._rest_server = rest
    server.servers.append(rest.start())
    server.setup_event_loop()
    server.register_signal_handler()
    log.info("serving %s (stages %d.. of bundle %s) on %s://%s:%d%s", model.name, model.after + 1, model.fingerprint,
             "https" if tls_cert else "http", host, port, " (client certificates required)" if tls_client_ca else "")
    asyncio.run(server._serve())
