"""``edgeexit serve``: host a bundle's stages after K for boards that offload (KServe v2; the ``server`` extra)."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import click

from ..errors import UsageError

log = logging.getLogger(__name__)

MAX_BATCH = 256
#: --max-batch-size and --max-batch-latency-ms defaults (docs/OFFLOAD.md, "Batching across boards": why 1)
DEFAULT_BATCH = 1
DEFAULT_BATCH_LATENCY_MS = 0.0

SERVER_FIX = ("install the server extra in its own environment: `bash scripts/env.sh server` in an edgeexit checkout "
              "(then .venv-server/bin/edgeexit serve), or pip install -c requirements/constraints-server.txt "
              "'.[device,server]'")


def read_token(path: str | None) -> str | None:
    """The bearer token in ``path`` (one line, surrounding whitespace dropped); UsageError when unusable."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4097)
    except OSError as exc:
        raise UsageError(f"token file {path}: {exc.strerror or exc}; give a readable file holding the token") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"token file {path}: the token must be printable ASCII") from None
    if len(raw) > 4096 or not token or not token.isprintable() or " " in token:
        raise UsageError(f"token file {path}: expected one token of 1..4096 printable characters without spaces")
    if len(token) < 16:
        raise UsageError(f"token file {path}: the token has {len(token)} characters; use at least 16 random ones "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--after", "after", type=int, required=True, metavar="K",
              help="The last stage the boards run: this server runs stages K+1.. of BUNDLE.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--token-file", default=None, metavar="FILE",
              help="Require 'Authorization: Bearer TOKEN' with the token in FILE (health probes excepted).")
@click.option("--tls-cert", default=None, metavar="PEM", help="Serve HTTPS with this certificate (with --tls-key).")
@click.option("--tls-key", default=None, metavar="PEM", help="The certificate's private key.")
@click.option("--tls-client-ca", default=None, metavar="PEM",
              help="mTLS: require every board to present a client certificate signed by a CA in PEM (with --tls-cert).")
@click.option("--threads", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Interpreter threads per stage.")
@click.option("--trusted-key", metavar="PUBLIC.pem", default=None,
              help="Refuse the bundle unless it is signed by this Ed25519 public key.")
@click.option("--max-batch-size", type=click.IntRange(1, MAX_BATCH), default=DEFAULT_BATCH, show_default=True,
              metavar="N", help="Batch up to N concurrent requests (from any boards) into one call of the tail on a "
                                "worker thread; 1: each request runs on its own, on the event loop.")
@click.option("--max-batch-latency-ms", type=click.FloatRange(0, 1000), default=None, metavar="T",
              help=f"With --max-batch-size above 1: how long a batch waits for more requests after its first "
                   f"[default: {DEFAULT_BATCH_LATENCY_MS:g}; 0: only what is already queued].")
@click.option("--inject-delay-ms", type=click.FloatRange(0, 10_000), default=0.0, show_default=True,
              help="Benchmark aid: wait this long before each answer, as a slower network would. Keep 0 in use.")
def serve(bundle: str, after: int, host: str, port: int, token_file: str | None, tls_cert: str | None,
          tls_key: str | None, tls_client_ca: str | None, threads: int, trusted_key: str | None,
          max_batch_size: int, max_batch_latency_ms: float | None, inject_delay_ms: float) -> None:
    """Serve BUNDLE's stages after K as a KServe v2 model (Open Inference Protocol, REST) for boards that run
    `edgeexit run/bench --offload URL --offload-after K`. Model name: <bundle name>-after-<K>."""
    if importlib.util.find_spec("kserve") is None:
        raise UsageError(f"'edgeexit serve' needs kserve, which is not installed here; {SERVER_FIX}")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together; give both, or neither for plain HTTP")
    for path in (tls_cert, tls_key):
        if path is not None and not os.access(path, os.R_OK):
            raise UsageError(f"{path}: no such readable file (--tls-cert / --tls-key)")
    if tls_client_ca is not None and tls_cert is None:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked in the TLS "
                         "handshake")
    _check_tls(tls_cert, tls_key, tls_client_ca)
    if max_batch_latency_ms is None:
        max_batch_latency_ms = DEFAULT_BATCH_LATENCY_MS
    elif max_batch_size == 1:
        raise UsageError("--max-batch-latency-ms needs --max-batch-size N with N above 1 (1 does not batch)")
    token = read_token(token_file)
    _check_port(host, port)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --token-file: anyone who reaches the port can use the server", host)

    from ..offload.server import TailModel, serve as run_server
    from ..runtime.bundle import load_bundle
    from ..runtime.manifest import ExitRuleSpec
    from ..runtime.rules import rule_from_spec
    from ..runtime.runner import Runner

    loaded = load_bundle(bundle, check_tensors=False, trusted_key=trusted_key)
    last = loaded.manifest.num_exits - 1
    if not 0 <= after < last:
        raise UsageError(f"--after {after}: the bundle has stages 0..{last}; give K in 0..{last - 1} (the boards run "
                         "stages 0..K, this server the rest)")
    runner = Runner(loaded, num_threads=threads, power_sensor=None)

    def make_rule(spec: dict[str, Any]) -> Any:
        return rule_from_spec(ExitRuleSpec.from_dict(spec, where="rule"))

    model = TailModel(runner, after, make_rule, inject_delay_ms=inject_delay_ms, max_batch_size=max_batch_size,
                      max_batch_latency_ms=max_batch_latency_ms)
    required = [w for w, on in (("token", token), ("client certificate", tls_client_ca)) if on]
    batching = (f", batches of up to {max_batch_size} within {max_batch_latency_ms:g} ms" if max_batch_size > 1
                else "")
    click.echo(f"serving {model.name} (stages {after + 1}..{last} of {bundle}) on "
               f"{'https' if tls_cert else 'http'}://{host}:{port}"
               f"{' (' + ' and '.join(required) + ' required)' if required else ''}{batching}", err=True)
    run_server(model, host, port, token=token, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca)


def _check_tls(cert: str | None, key: str | None, client_ca: str | None) -> None:
    """UsageError (one line) when the certificate, its key or the client CA cannot be loaded, before starting."""
    import ssl

    from ..offload.client import _ssl_why

    if cert is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--tls-cert {cert} with --tls-key {key}: not a PEM certificate with its private key "
                         f"({_ssl_why(exc)})") from None
    if client_ca is None:
        return
    if not os.access(client_ca, os.R_OK):
        raise UsageError(f"--tls-client-ca {client_ca}: no such readable file")
    try:
        context.load_verify_locations(cafile=client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--tls-client-ca {client_ca}: not PEM CA certificates ({_ssl_why(exc)})") from None
    if not context.get_ca_certs():
        raise UsageError(f"--tls-client-ca {client_ca}: holds no CA certificate (a CA's own certificate is needed, "
                         "with basicConstraints CA:TRUE)")


def _check_port(host: str, port: int) -> None:
    """UsageError when ``host:port`` cannot be listened on (in use, or not an address of this machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or "
                         "--host") from None


__all__ = ["serve", "read_token"]
