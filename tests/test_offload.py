"""Offloading against the real server: `edgeexit serve` (KServe's model server) started from the server environment
on loopback, and small stdlib servers that misbehave on purpose (wrong shapes, huge and slow bodies, garbage).

The server environment is separate (kserve and TensorFlow need different protobufs): build it with
`bash scripts/env.sh server` and set EDGEEXIT_SERVER_PYTHON=.venv-server/bin/python (scripts/test.sh does both).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgeexit import ConfidenceRule, UsageError
from edgeexit.offload.client import OffloadClient, OffloadFailure, OffloadPolicy
from edgeexit.offload.protocol import bundle_fingerprint, tail_model_name
from edgeexit.runtime.rules import FixedExitRule
from edgeexit.runtime.runner import Runner

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV = "EDGEEXIT_SERVER_PYTHON"
AFTER = 0
TOKEN = "test-token-0123456789abcdef"
DEADLINE_S = 0.3
SLACK_S = 0.25  # what a call may take beyond the deadline: the local stages and a busy 2-core machine


def _server_python() -> str:
    path = os.environ.get(SERVER_ENV)
    if not path:
        pytest.fail(f"${SERVER_ENV} is not set: build the server environment with `bash scripts/env.sh server` and set "
                    f"{SERVER_ENV}=.venv-server/bin/python (scripts/test.sh does both)", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"${SERVER_ENV}={path} is not an executable Python; run `bash scripts/env.sh server`",
                    pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `edgeexit serve` process on loopback."""

    def __init__(self, python: str, bundle: Path, tmp: Path, *extra: str):
        self.port, self.ca = _free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([python, "-m", "edgeexit", "serve", str(bundle), "--after", str(AFTER),
                                          "--port", str(self.port), *extra], stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 45) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"edgeexit serve exited {self.proc.returncode}: {self.log.read_text()[-800:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1, context=self._tls()) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"edgeexit serve not ready within {timeout_s} s: {self.log.read_text()[-800:]}")

    def _tls(self):
        import ssl

        if not self.url.startswith("https"):
            return None
        context = ssl.create_default_context(cafile=self.ca)
        if getattr(self, "pki", None) is not None:  # a server that requires a client certificate
            context.load_cert_chain(self.pki / "board.pem", self.pki / "board.key")
        return context

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeexit test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _issue(tmp: Path, name: str, ca: tuple | None = None, server: bool = False) -> tuple:
    """A certificate ``name`` (with its key, as PEM files ``tmp/name.pem``, ``tmp/name.key``): a CA of its own when
    ``ca`` is None, else signed by ``ca`` (a pair returned by this function) for a TLS server at 127.0.0.1 or for
    a client. Returns (certificate, key) objects; the paths are ``tmp / f"{name}.pem"`` and ``.key``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeexit test {name}")])
    issuer, signer = (subject, key) if ca is None else (ca[0].subject, ca[1])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), True))
    if ca is not None:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    cert = builder.sign(signer, hashes.SHA256())
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return cert, key


BATCH = 8


@pytest.fixture(scope="module")
def servers(tiny_bundle, tmp_path_factory):
    """Started together: a server requiring a token, one answering 20 ms late (stopped by one test), one serving
    HTTPS with a self-signed certificate, one batching requests (stopped by one test), and one requiring client
    certificates of a throwaway fleet CA (mTLS; ``pki`` holds that CA's files and a board's)."""
    python = _server_python()
    tmp = tmp_path_factory.mktemp("serve")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cert, key = _self_signed(tmp)
    pki = tmp / "pki"
    pki.mkdir()
    fleet = _issue(pki, "fleet-ca")
    _issue(pki, "server", fleet, server=True)
    _issue(pki, "board", fleet)
    _issue(pki, "stranger", _issue(pki, "other-ca"))
    started = {"token": Served(python, tiny_bundle, tmp, "--token-file", str(token_file)),
               "slow": Served(python, tiny_bundle, tmp, "--inject-delay-ms", "20"),
               "tls": Served(python, tiny_bundle, tmp, "--tls-cert", str(cert), "--tls-key", str(key)),
               "batched": Served(python, tiny_bundle, tmp, "--max-batch-size", str(BATCH), "--max-batch-latency-ms",
                                 "5"),
               "mtls": Served(python, tiny_bundle, tmp, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                              str(pki / "server.key"), "--tls-client-ca", str(pki / "fleet-ca.pem"))}
    for name, ca in (("tls", cert), ("mtls", pki / "fleet-ca.pem")):
        started[name].url = started[name].url.replace("http://", "https://")
        started[name].ca = ca
    started["mtls"].pki = pki
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def images():
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import synthetic_digits

    return synthetic_digits(120, seed=11)[0]


@pytest.fixture(scope="module")
def rule(tiny_bundle, images):
    """A confidence rule that lets about half the inputs past exit 0 and stops some of those at exit 1."""
    trace = Runner(tiny_bundle, power_sensor=None).trace(images)
    conf = [1 / (1 + np.exp(-c.ravel())) for c in trace.confidence[:2]]
    return ConfidenceRule([float(np.median(conf[0])), float(np.median(conf[1]))])


@pytest.fixture(scope="module")
def local(tiny_bundle, rule):
    return Runner(tiny_bundle, rule=rule, power_sensor=None)


def _offloading(bundle, url, rule, **kw):
    kw.setdefault("offload_policy", OffloadPolicy(always=True))
    kw.setdefault("offload_timeout_s", DEADLINE_S)
    return Runner(bundle, rule=rule, power_sensor=None, offload=url, offload_after=AFTER, **kw)


def test_offloaded_answers_equal_the_local_runner(servers, tiny_bundle, rule, local, images):
    board = _offloading(tiny_bundle, servers["token"].url, rule, offload_token=TOKEN)
    same_interpreter = board.backend.name == "ai-edge-litert"  # the server environment's interpreter
    offloaded = 0
    for image in images:
        mine, theirs = local.classify(image), board.classify(image)
        assert theirs.offload_error is None
        assert (theirs.label, theirs.exit_index, theirs.macs) == (mine.label, mine.exit_index, mine.macs)
        if same_interpreter:  # bit for bit; tflite-runtime 2.14's kernels round a few int8 outputs differently
            assert theirs.score == mine.score
            assert np.array_equal(theirs.probabilities, mine.probabilities)
        if theirs.offloaded:
            offloaded += 1
            assert theirs.exit_index > AFTER and theirs.round_trip_ms > 0
            assert theirs.local_macs == board.manifest.cumulative_macs()[AFTER]
            assert theirs.local_macs + theirs.remote_macs == theirs.macs and theirs.remote_macs > 0
        else:
            assert theirs.exit_index == AFTER and theirs.remote_macs == 0
    assert 30 <= offloaded <= 90, offloaded  # the rule sends about half past exit 0
    assert board.offload.answered == offloaded and board.offload.failures == 0


def test_a_request_without_the_token_is_refused(servers, tiny_bundle, rule, images):
    model = tail_model_name(Runner(tiny_bundle, power_sensor=None).manifest.name, AFTER)
    request = urllib.request.Request(f"{servers['token'].url}/v2/models/{model}/infer", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    board = _offloading(tiny_bundle, servers["token"].url, rule, offload_token="wrong-token-0123456789")
    results = [board.classify(image) for image in images[:20]]
    assert not any(r.offloaded for r in results)
    errors = [r.offload_error for r in results if r.offload_error]
    assert errors and errors[0] == "HTTP 401: missing or wrong bearer token (Authorization: Bearer TOKEN)"


def test_https_with_the_servers_certificate_and_refused_without_it(servers, tiny_bundle, rule, local, images):
    board = _offloading(tiny_bundle, servers["tls"].url, rule, offload_ca=str(servers["tls"].ca))
    answers = [(board.classify(image), local.classify(image)) for image in images[:30]]
    assert sum(r.offloaded for r, _ in answers) >= 5
    assert all((r.label, r.exit_index) == (m.label, m.exit_index) and r.offload_error is None for r, m in answers)
    stranger = _offloading(tiny_bundle, servers["tls"].url, rule)  # the system's CAs: the certificate is unknown
    errors = [r.offload_error for r in (stranger.classify(image) for image in images[:30]) if r.offload_error]
    assert errors and errors[0].startswith("TLS failure: CERTIFICATE_VERIFY_FAILED"), errors[:1]


def test_mtls_answers_a_board_with_a_fleet_certificate_and_refuses_one_without(servers, tiny_bundle, rule, local,
                                                                              images):
    served = servers["mtls"]
    pki = served.pki
    board = _offloading(tiny_bundle, served.url, rule, offload_ca=str(served.ca),
                        offload_cert=str(pki / "board.pem"), offload_key=str(pki / "board.key"))
    answers = [(board.classify(image), local.classify(image)) for image in images[:30]]
    assert sum(r.offloaded for r, _ in answers) >= 5
    assert all((r.label, r.exit_index) == (m.label, m.exit_index) and r.offload_error is None for r, m in answers)
    refused = {"none": ({}, "requires a client certificate and this board has none"),
               "stranger": ({"offload_cert": str(pki / "stranger.pem"), "offload_key": str(pki / "stranger.key")},
                            "refused this board's client certificate")}
    for who, (certificate, says) in refused.items():
        other = _offloading(tiny_bundle, served.url, rule, offload_ca=str(served.ca), **certificate)
        results = [(other.classify(image), local.classify(image)) for image in images[:30]]
        assert not any(r.offloaded for r, _ in results), who
        assert all((r.label, r.exit_index, r.score) == (m.label, m.exit_index, m.score) for r, m in results), who
        errors = [r.offload_error for r, _ in results if r.offload_error]
        assert errors and errors[0].startswith("TLS failure: ") and says in errors[0], (who, errors[0])
        assert "\n" not in errors[0]
        assert other.offload.answered == 0 and other.offload.failures == 3, who  # then it pauses


def test_a_batched_server_answers_concurrent_boards_like_the_local_runner(servers, tiny_bundle, rule, local,
                                                                          images):
    """8 boards at once against a server batching up to 8 requests: every answer is the one the local Runner
    gives for that board's own input (a batch that mixed up its inputs' answers would fail), and requests from
    several boards did run together."""
    expected = [local.classify(image) for image in images]
    same_interpreter = local.backend.name == "ai-edge-litert"
    boards = [_offloading(tiny_bundle, servers["batched"].url, rule, offload_timeout_s=10.0) for _ in range(BATCH)]
    results: list[list] = [[] for _ in boards]
    start = threading.Barrier(len(boards))

    def run(b: int) -> None:
        order = np.roll(np.arange(len(images)), 15 * b)  # different inputs in flight at the same time
        start.wait()
        results[b] = [(i, boards[b].classify(images[i])) for i in order]

    threads = [threading.Thread(target=run, args=(b,)) for b in range(len(boards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    offloaded = 0
    for b, answers in enumerate(results):
        assert len(answers) == len(images), b
        for i, r in answers:
            mine = expected[i]
            assert r.offload_error is None, r.offload_error
            assert (r.label, r.exit_index, r.macs) == (mine.label, mine.exit_index, mine.macs), (b, i)
            if same_interpreter:
                assert r.score == mine.score and np.array_equal(r.probabilities, mine.probabilities), (b, i)
            offloaded += r.offloaded
    assert offloaded == sum(board.offload.answered for board in boards) >= len(boards) * 30
    served = servers["batched"]
    served.stop()
    summary = re.search(r"ran (\d+) requests in (\d+) batches \(mean [\d.]+, largest (\d+)\)",
                        served.log.read_text())
    assert summary, served.log.read_text()[-800:]
    requests, batches, largest = map(int, summary.groups())
    assert requests == offloaded and 2 <= largest <= BATCH and batches < requests


def test_the_batcher_runs_queued_inputs_together_and_answers_each_its_own(tiny_bundle, rule, local, images):
    """Batcher without the server: 20 inputs queued at once run as batches of 8, 8 and 4 on the worker thread,
    each answer the Runner's for that input; an input whose call fails gets its own error, the others their
    answers; with no batch latency, inputs that come one at a time run one at a time (nothing waits)."""
    import asyncio

    from edgeexit.offload.batching import Batcher

    tail = Runner(tiny_bundle, rule=rule, power_sensor=None)
    feats = []
    stage0 = Runner(tiny_bundle, rule=FixedExitRule(AFTER), power_sensor=None)
    for image in images[:20]:
        stage0.classify(image)
        feats.append(stage0._stages[AFTER].feat.copy())
    expected = [tail.continue_from(AFTER, f) for f in feats]

    def run_batch(items):
        return [ValueError(f"input {i} refused") if i == 13 else tail.continue_from(AFTER, feats[i]) for i in items]

    async def together(batcher):
        return await asyncio.gather(*(batcher.submit(i) for i in range(20)), return_exceptions=True)

    batcher = Batcher(run_batch, max_size=8, max_latency_s=0.05)
    try:
        answers = asyncio.run(together(batcher))
    finally:
        batcher.close()
    assert batcher.stats() == {"batches": 3, "items": 20, "largest": 8, "mean": 20 / 3}
    for i, (got, want) in enumerate(zip(answers, expected)):
        if i == 13:
            assert isinstance(got, ValueError) and str(got) == "input 13 refused"
        else:
            assert (got.label, got.exit_index, got.score) == (want.label, want.exit_index, want.score), i

    async def one_by_one(batcher):
        return [await batcher.submit(i) for i in range(5)]

    batcher = Batcher(run_batch, max_size=8, max_latency_s=0.0)
    try:
        answers = asyncio.run(one_by_one(batcher))
    finally:
        batcher.close()
    assert batcher.stats()["batches"] == 5 and [a.label for a in answers] == [e.label for e in expected[:5]]


SERVE_ERRORS = [(["--max-batch-size", "0"], "--max-batch-size"),
                (["--max-batch-latency-ms", "5"], "--max-batch-latency-ms needs --max-batch-size N with N above 1"),
                (["--max-batch-size", "4", "--max-batch-latency-ms", "-1"], "--max-batch-latency-ms"),
                (["--tls-client-ca", "{pki}/fleet-ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
                (["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/server.key", "--tls-client-ca",
                  "{pki}/board.pem"], "holds no CA certificate"),
                (["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/server.key", "--tls-client-ca",
                  "{pki}/missing.pem"], "no such readable file"),
                (["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/board.key"],
                 "not a PEM certificate with its private key (KEY_VALUES_MISMATCH)")]


def test_serve_refuses_bad_batching_and_client_ca_options_with_one_line(servers, tiny_bundle):
    python, pki = _server_python(), servers["mtls"].pki
    for extra, says in SERVE_ERRORS:
        args = [a.format(pki=pki) for a in extra]
        done = subprocess.run([python, "-m", "edgeexit", "serve", str(tiny_bundle), "--after", "0",
                               "--port", str(_free_port()), *args], capture_output=True, text=True, timeout=60,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], \
            (extra, done.stderr[-600:])


def test_a_client_certificate_is_checked_when_the_runner_is_created(servers, tiny_bundle):
    pki = servers["mtls"].pki
    with pytest.raises(UsageError, match=r"^offload client certificate .*KEY_VALUES_MISMATCH"):
        Runner(tiny_bundle, power_sensor=None, offload="https://127.0.0.1:9", offload_after=AFTER,
               offload_cert=str(pki / "board.pem"), offload_key=str(pki / "stranger.key"))
    with pytest.raises(UsageError, match="a client certificate is for https servers"):
        Runner(tiny_bundle, power_sensor=None, offload="http://127.0.0.1:9", offload_after=AFTER,
               offload_cert=str(pki / "board.pem"), offload_key=str(pki / "board.key"))


def test_bench_reports_offload_against_local(servers, tiny_bundle, rule, images):
    from edgeexit.bench.bench import BenchSettings, run_benchmark
    from edgeexit.datasets import ImageSet

    data = ImageSet(images[:40], np.zeros(40, np.int64), tuple(str(c) for c in range(10)), "synthetic")
    settings = BenchSettings(warmup=2, repeat=1, rule=rule, sweep=False, batch_sizes=(1,), points=False,
                             offload={"offload": servers["token"].url, "offload_after": AFTER, "offload_token": TOKEN,
                                      "offload_policy": OffloadPolicy(always=True)})
    o = run_benchmark(tiny_bundle, data, settings)["offload"]
    undecided = float(np.mean(np.array(run_benchmark(tiny_bundle, data, BenchSettings(
        warmup=0, repeat=1, rule=rule, sweep=False, batch_sizes=(1,), points=False))["inputs"]["exit"]) > AFTER))
    assert o["share_offloaded"] == o["undecided_after_stage"] == undecided > 0.2
    assert o["agreement_with_local"] == 1.0 and o["requests"]["failed"] == 0 and not o["fallback_reasons"]
    assert o["round_trip_ms"]["p50"] > 0 and o["latency_ms"]["p90"] > o["local_latency_ms"]["p90"]


def test_the_server_describes_the_tail_and_refuses_a_wrong_shape_with_one_line(servers, tiny_bundle):
    runner = Runner(tiny_bundle, power_sensor=None)
    client = OffloadClient(servers["token"].url, tail_model_name(runner.manifest.name, AFTER), token=TOKEN,
                           timeout_s=5)
    fingerprint = bundle_fingerprint([s.sha256 for s in runner.manifest.stages])
    rule = json.dumps(runner.rule.to_spec().to_dict())
    model = tail_model_name(runner.manifest.name, AFTER)
    metadata = urllib.request.Request(f"{servers['token'].url}/v2/models/{model}",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(metadata, timeout=5) as r:
        meta = json.load(r)
    assert meta["inputs"] == [{"name": "handoff", "datatype": "INT8", "shape": [1, 28, 28, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "exit_index", "score", "probabilities", "logits"]
    with pytest.raises(OffloadFailure, match=r"^HTTP 400: handoff must be INT8 \[1, 28, 28, 8\], got INT8 \[1, 4\]$"):
        client.infer(np.zeros((1, 4), np.int8), fingerprint, rule, 10, AFTER + 1, 2, "int8")
    with pytest.raises(OffloadFailure, match=r"^HTTP 400: this server hosts bundle [0-9a-f]{16}"):
        client.infer(np.zeros((1, 28, 28, 8), np.int8), "0" * 16, rule, 10, AFTER + 1, 2, "int8")


def test_policy_stops_offloading_to_a_slow_server(servers, tiny_bundle, rule, images):
    board = _offloading(tiny_bundle, servers["slow"].url, rule, offload_policy=OffloadPolicy(probe_every_s=60))
    results = [board.classify(image) for image in images[:40]]
    sent = [r for r in results if r.offloaded]
    assert len(sent) == 1 and sent[0].round_trip_ms >= 20  # the first undecided input measures the round trip
    policy = board.offload.policy
    assert policy.round_trip_ms >= 20 and policy.round_trip_ms > policy.local_ms * (1 + policy.margin)
    assert sum(r.exit_index > AFTER for r in results) > 5  # more inputs could have gone, and ran here


def test_server_stopped_mid_run_every_input_answered_locally_within_the_deadline(servers, tiny_bundle, rule, local,
                                                                              images):
    board = _offloading(tiny_bundle, servers["slow"].url, rule)
    for image in images[:10]:
        board.classify(image)
    assert board.offload.answered > 0
    servers["slow"].stop()
    for image in images[10:]:
        t0 = time.perf_counter()
        r = board.classify(image)
        took = time.perf_counter() - t0
        mine = local.classify(image)
        assert (r.label, r.exit_index) == (mine.label, mine.exit_index) and not r.offloaded
        assert took < DEADLINE_S + SLACK_S
        if r.exit_index > AFTER:
            assert r.offload_error.startswith(("server unreachable", "offload paused")), r.offload_error
    assert board.offload.failures == 3  # then it pauses: a dead server costs three requests, not one per input


# ---- servers that misbehave: stdlib http.server, one behaviour per path ----------------------------------------

def _answer(n_classes: int = 10, logits_len: int = 10) -> bytes:
    logits = list(range(logits_len))
    return json.dumps({"outputs": [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [n_classes - 1]},
        {"name": "exit_index", "datatype": "INT32", "shape": [1], "data": [1]},
        {"name": "score", "datatype": "FP32", "shape": [1], "data": [0.5]},
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10},
        {"name": "logits", "datatype": "INT8", "shape": [1, logits_len], "data": logits}]}).encode()


class _Faulty(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.path.split("/")[1]
        if mode == "wrong_shape":
            return self._send(200, _answer(logits_len=7))
        if mode == "garbage":
            return self._send(200, b"<html>not json{")
        if mode == "error":
            return self._send(503, json.dumps({"error": "model is overloaded\nretry later"}).encode())
        if mode == "huge":  # no Content-Length: the body runs until the connection closes (100 MB)
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(1600):
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True
            return None
        if mode == "slow":  # headers at once, then the body one byte every 20 ms
            body = _answer()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for b in body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass
            return None
        return self._send(200, _answer())

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def faulty():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


FAULTS = [("wrong_shape", "http", r"^bad answer: answer's 'logits' has 7 values, expected 10 \(wrong shape\)$"),
          ("garbage", "http", r"^bad answer: answer is not JSON \(15 bytes\)$"),
          ("error", "http", r"^HTTP 503: model is overloaded retry later$"),
          ("huge", "http", r"^answer exceeds the limit of 65536 bytes$"),
          ("slow", "http", r"^no answer within the deadline \(300 ms\)$"),
          ("tls", "https", r"^TLS failure: ")]


@pytest.mark.parametrize("mode,scheme,reason", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_faulty_server_costs_at_most_the_deadline_and_says_why(faulty, tiny_bundle, rule, local, images, mode,
                                                                 scheme, reason):
    url = faulty.replace("http", scheme) + f"/{mode}"
    board = _offloading(tiny_bundle, url, rule)
    tried = 0
    for image in images[:30]:
        t0 = time.perf_counter()
        r = board.classify(image)
        took = time.perf_counter() - t0
        mine = local.classify(image)
        assert (r.label, r.exit_index, r.score) == (mine.label, mine.exit_index, mine.score) and not r.offloaded
        assert took < DEADLINE_S + SLACK_S
        if r.exit_index > AFTER and tried < 3:
            tried += 1
            assert re.search(reason, r.offload_error), r.offload_error
            assert "\n" not in r.offload_error
    assert tried == 3 and board.offload.failures == 3


def test_rules_with_state_between_exits_cannot_be_offloaded(tiny_bundle):
    with pytest.raises(UsageError, match="fallback 'most_confident'"):
        Runner(tiny_bundle, power_sensor=None, rule=ConfidenceRule([0.5, 0.5], fallback="most_confident"),
               offload="http://127.0.0.1:9", offload_after=AFTER)
    with pytest.raises(UsageError, match=r"offload_after=K with K in 0\.\.1"):
        Runner(tiny_bundle, power_sensor=None, offload="http://127.0.0.1:9", offload_after=2)


def test_the_policy_offloads_only_while_the_round_trip_pays():
    policy = OffloadPolicy(margin=0.1, probe_every_s=10)
    policy.ran_locally(2.0)
    assert policy.choose(0.0) == (True, None)           # nothing measured yet: measure
    policy.succeeded(2.1)                               # 2.1 < 2.0 x 1.1
    assert policy.choose(1.0) == (True, None)
    policy.succeeded(4.0)                               # EWMA 2.1 -> 2.48 > 2.2
    assert policy.choose(2.0) == (False, None)
    assert policy.choose(10.5) == (False, None)
    assert policy.choose(11.5) == (True, None)          # a probe, 10 s after the last request
    for now in (12.0, 12.1, 12.2):
        policy.failed("server unreachable: Connection refused", now)
    send, why = policy.choose(13.0)
    assert not send and why.startswith("offload paused for 4.2 s more after 3 failures in a row")
    assert policy.choose(17.3) == (True, None)          # the pause is over: one request tries again
    policy.failed("server unreachable: Connection refused", 17.4)
    assert policy.paused_until == pytest.approx(17.4 + 10)   # and the pause doubles


def test_the_policy_starts_from_exit_costs_timed_on_this_machine(tiny_bundle_copy):
    from edgeexit.bench.timing import this_machine
    from edgeexit.cli.device import offload_kwargs
    from edgeexit.runtime.bundle import load_bundle

    manifest = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    costs = {"latency_ms": {"fixed": [0.01, 0.03, 0.07], "confidence": [0.02, 0.05, 0.11]}, "monolithic_ms": 0.05,
             "inputs": 10, "repeat": 1, **this_machine()}
    options = dict(offload_url="http://127.0.0.1:9", offload_after=0, offload_token_file=None, offload_ca=None,
                   offload_timeout_ms=250, offload_margin=0.1, offload_always=False)
    for stamp, expected in (({}, 0.11 - 0.02), ({"machine": "another machine"}, None)):
        manifest.setdefault("operating_points", {})["exit_costs"] = {**costs, **stamp}
        (tiny_bundle_copy / "manifest.json").write_text(json.dumps(manifest))
        loaded = load_bundle(tiny_bundle_copy, check_tensors=False)
        policy = offload_kwargs(loaded, None, **options)["offload_policy"]  # the bundle's rule: confidence
        assert policy.local_ms == (None if expected is None else pytest.approx(expected))
        runner = Runner(loaded, power_sensor=None, **offload_kwargs(loaded, None, **options))
        if expected is None:  # timed by the Runner: the two stages after stage 0 of the tiny network
            assert 0 < runner.offload.policy.local_ms < 5 and runner.offload.policy.local_from.startswith("timed")
        else:
            assert runner.offload.policy.local_ms == pytest.approx(expected)
