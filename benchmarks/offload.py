"""Offloading hard inputs to the real server (`edgeexit serve`, KServe's model server) on loopback.

1. Latency: for injected round trips (a delay the server adds before each answer, ``--inject-delay-ms``: a
   benchmark aid standing in for the network), the whole-call latency of every input: offload with the policy on
   (default margin) against local only, interleaved per input; then offload of every undecided input ("always")
   against local only. p50/p90/p99, share offloaded, agreement with the local answers.
2. Server throughput: 1, 8 and 32 simulated boards (threads, one keep-alive connection each) sending real
   stage-K hand-offs as fast as answers come back, no injected delay; requests per second and latency, for each
   server configuration of ``--batching`` (``1``: unbatched; ``N:T``: ``--max-batch-size N
   --max-batch-latency-ms T``), the configurations interleaved row by row (one server each, all started at once).

Runs in the device environment (the board's side) and starts the server from the server environment::

    .venv-device/bin/python benchmarks/offload.py --server-python .venv-server/bin/python \\
        --bundle /work/demo/mnist-bundle --after 0

The bundle is copied to a temporary directory first (the original is never touched). Writes the latency run to
benchmarks/results/offload_<bundle>.json and the throughput run to benchmarks/results/offload_throughput.json
(one entry per bundle, other bundles' entries kept). Boards and server share this machine's cores: the
throughput is that of one server process next to its clients, not of a dedicated server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.bench.envinfo import collect_environment  # noqa: E402
from edgeexit.bench.timing import latency_summary  # noqa: E402
from edgeexit.datasets import load_dataset  # noqa: E402
from edgeexit.offload.client import OffloadClient, OffloadPolicy  # noqa: E402
from edgeexit.offload.protocol import bundle_fingerprint, tail_model_name  # noqa: E402
from edgeexit.runtime.rules import FixedExitRule  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, python: str, bundle: Path, after: int, delay_ms: float, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.out = open(log, "wb")
        self.proc = subprocess.Popen([python, "-m", "edgeexit", "serve", str(bundle), "--after", str(after),
                                      "--port", str(self.port), "--inject-delay-ms", str(delay_ms), *extra],
                                     stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_ready(self) -> "Server":
        log = self.log
        end = time.monotonic() + 90
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"error: the server exited; see {log}")
                time.sleep(0.2)
        raise SystemExit(f"error: the server did not start within 90 s; see {log}")

    def stop(self) -> str | None:
        """Stop it; the batcher's summary line ("ran N requests in M batches ...") if it printed one."""
        self.proc.terminate()
        self.proc.wait(15)
        self.out.close()
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if "requests in" in ln]
        return lines[-1].split(": ", 1)[-1] if lines else None


def timed(variants: dict, images: np.ndarray, repeat: int) -> tuple[dict, dict]:
    """Each variant's whole-call latency per input (median over ``repeat`` passes; variants interleaved per input
    in rotating order) and its first pass's answers."""
    names = list(variants)
    for image in images[:20]:  # warm-up: connections, first requests
        for call in variants.values():
            call(image)
    ms = {n: np.empty((repeat, len(images))) for n in names}
    answers = {n: [] for n in names}
    clock = time.perf_counter_ns
    for rep in range(repeat):
        for i, image in enumerate(images):
            for j in range(len(names)):
                name = names[(i + j + rep) % len(names)]
                t0 = clock()
                r = variants[name](image)
                ms[name][rep, i] = (clock() - t0) * 1e-6
                if rep == 0:
                    answers[name].append(r)
    return {n: np.median(v, axis=0) for n, v in ms.items()}, answers


def latency_run(bundle: Path, url: str, after: int, images: np.ndarray, timeout_s: float, repeat: int) -> dict:
    """Two passes, each against local calls interleaved with it: the policy (default margin), then offloading
    every undecided input. (Apart, because the second one's requests keep the server busy on the same cores,
    which would slow whatever call comes next.)"""
    out = {}
    local = Runner(bundle, power_sensor=None)
    for name, policy in (("policy", OffloadPolicy()), ("always", OffloadPolicy(always=True))):
        board = Runner(bundle, power_sensor=None, offload=url, offload_after=after, offload_timeout_s=timeout_s,
                       offload_policy=policy)
        ms, answers = timed({"local": local.classify, name: board.classify}, images, repeat)
        base = [(r.label, r.exit_index) for r in answers["local"]]
        res = answers[name]
        sent = [r.round_trip_ms for r in res if r.offloaded]
        lat, loc = latency_summary(ms[name]), latency_summary(ms["local"])
        out[name] = {"latency_ms": lat, "local_latency_ms": loc,
                     "vs_local": {p: lat[p] / loc[p] for p in ("p50", "p90", "p99", "mean")},
                     "share_offloaded": len(sent) / len(res), "share_offloaded_of": "the first pass's answers",
                     "round_trip_ms": latency_summary(np.array(sent)),
                     "same_answers_as_local": float(np.mean([(r.label, r.exit_index) == b
                                                             for r, b in zip(res, base)])),
                     "requests": {"sent": board.offload.sent, "answered": board.offload.answered,
                                  "failed": board.offload.failures},
                     "policy": board.offload.policy.to_dict()}
        out["undecided_after_stage"] = float(np.mean([r.exit_index > after for r in answers["local"]]))
    return out


def handoffs(bundle: Path, after: int, images: np.ndarray) -> list[np.ndarray]:
    """Real stage-``after`` hand-offs: each image run to exit ``after``, that stage's features copied."""
    runner = Runner(bundle, power_sensor=None, rule=FixedExitRule(after))
    feats = []
    for image in images:
        runner.classify(image)
        feats.append(runner._stages[after].feat.copy())  # the features tensor stage `after` just wrote
    return feats


def throughput_run(bundle: Path, url: str, after: int, feats: list[np.ndarray], boards: int,
                   seconds: float) -> dict:
    runner = Runner(bundle, power_sensor=None)
    m = runner.manifest
    name, fp = tail_model_name(m.name, after), bundle_fingerprint([s.sha256 for s in m.stages])
    rule = json.dumps(runner.rule.to_spec().to_dict(), sort_keys=True)
    dtype = m.stages[-1].outputs["logits"].dtype
    stop = time.monotonic() + seconds
    times: list[list[float]] = [[] for _ in range(boards)]
    failures = [0] * boards

    def board(b: int) -> None:
        client = OffloadClient(url, name, timeout_s=5.0)
        i = b
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                client.infer(feats[i % len(feats)], fp, rule, m.num_classes, after + 1, m.num_exits - 1, dtype)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                failures[b] += 1
                continue
            times[b].append((time.perf_counter() - t0) * 1e3)
            i += boards
        client.close()

    threads = [threading.Thread(target=board, args=(b,)) for b in range(boards)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    done = sum(len(t) for t in times)
    lat = np.array([x for t in times for x in t])
    return {"boards": boards, "seconds": round(wall, 3), "requests": done, "failed": sum(failures),
            "requests_per_s": done / wall, "latency_ms": latency_summary(lat), "_latencies": lat}


def batching_configs(text: str) -> dict[str, list[str]]:
    """``1,32:0,32:2`` -> {label: serve options}: ``1`` unbatched, ``N:T`` batches of up to N within T ms."""
    out = {}
    for item in text.split(","):
        n, _, t = item.strip().partition(":")
        if int(n) == 1:
            out["unbatched"] = ["--max-batch-size", "1"]
        else:
            out[f"batched {int(n)} / {float(t or 0):g} ms"] = ["--max-batch-size", str(int(n)),
                                                              "--max-batch-latency-ms", f"{float(t or 0):g}"]
    return out


def throughput(args: argparse.Namespace, bundle: Path, tmp: Path, images: np.ndarray) -> dict:
    """Every batching configuration's server started at once; for each number of boards, the configurations one
    after another (their order rotating), ``--rounds`` times; each row pools its rounds."""
    configs = batching_configs(args.batching)
    servers = {label: Server(args.server_python, bundle, args.after, 0.0, tmp / f"serve-{i}.log", *extra)
               for i, (label, extra) in enumerate(configs.items())}
    rows: dict[str, dict[str, list[dict]]] = {label: {} for label in configs}
    summaries = {}
    try:
        for server in servers.values():
            server.wait_ready()
        feats = handoffs(bundle, args.after, images[:200])
        labels = list(configs)
        for rnd in range(args.rounds):
            for boards in (int(b) for b in args.boards.split(",")):
                for j in range(len(labels)):
                    label = labels[(j + rnd) % len(labels)]
                    row = throughput_run(bundle, servers[label].url, args.after, feats, boards, args.seconds)
                    rows[label].setdefault(str(boards), []).append(row)
                    print(f"round {rnd + 1}, {boards} boards, {label}: {row['requests_per_s']:.0f} req/s, p50 "
                          f"{row['latency_ms']['p50']:.2f} ms", file=sys.stderr)
    finally:
        for label, server in servers.items():
            summaries[label] = server.stop()
    out = {}
    for label, by_boards in rows.items():
        out[label] = {"serve_options": configs[label], "server_summary": summaries.get(label), "boards": {}}
        for boards, runs in by_boards.items():
            lat = np.concatenate([r["_latencies"] for r in runs])
            done, wall = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
            out[label]["boards"][boards] = {
                "boards": int(boards), "rounds": len(runs), "seconds": round(wall, 3), "requests": done,
                "failed": sum(r["failed"] for r in runs), "requests_per_s": done / wall,
                "requests_per_s_per_round": [round(r["requests_per_s"], 1) for r in runs],
                "latency_ms": latency_summary(lat)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-python", default=os.environ.get("EDGEEXIT_SERVER_PYTHON", ".venv-server/bin/python"))
    ap.add_argument("--bundle", default="/work/demo/mnist-bundle")
    ap.add_argument("--data", default="mnist", help="data set of the inputs (edgeexit.datasets names)")
    ap.add_argument("--after", type=int, default=0)
    ap.add_argument("--images", type=int, default=1000, help="test images of the latency run")
    ap.add_argument("--delays-ms", default="1,5,20")
    ap.add_argument("--repeat", type=int, default=3, help="passes; each input's latency is its median over them")
    ap.add_argument("--boards", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=4.0, help="per throughput point and round")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds (configurations interleaved)")
    ap.add_argument("--batching", default="1,32:0,32:2",
                    help="server configurations of the throughput run: 1 (unbatched) or N:T (batch size, ms)")
    ap.add_argument("--only", choices=("latency", "throughput"), default=None)
    ap.add_argument("--timeout-ms", type=float, default=250.0)
    ap.add_argument("--out", default=None, help="latency result (default benchmarks/results/offload_<bundle>.json)")
    ap.add_argument("--throughput-out", default=str(ROOT / "benchmarks" / "results" / "offload_throughput.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="offload-bench-"))
    bundle = tmp / Path(args.bundle).name
    shutil.copytree(args.bundle, bundle)  # never the original
    data = load_dataset(args.data, split="test", limit=args.images)
    runner = Runner(bundle, power_sensor=None)
    name = runner.manifest.name
    environment = collect_environment(num_threads=1)
    created = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        if args.only != "throughput":
            result = {"benchmark": "offload", "created": created,
                      "bundle": {"name": name, "source": args.bundle, "rule": repr(runner.rule)}, "after": args.after,
                      "images": f"{args.data} test[:{args.images}]", "timeout_ms": args.timeout_ms,
                      "environment": environment, "repeat": args.repeat,
                      "method": ("whole call of Runner.classify per input (its median over the repeats); two passes, "
                                 "each interleaving local-only calls with one offloading Runner per input: the default "
                                 "policy (margin 10 %), then offloading every undecided input; the server is `edgeexit "
                                 "serve` (KServe 0.21 model server, REST, one process, unbatched) on loopback, adding "
                                 "--inject-delay-ms before each answer; 20 warm-up inputs"),
                      "latency": {}}
            for delay in (float(d) for d in args.delays_ms.split(",")):
                server = Server(args.server_python, bundle, args.after, delay, tmp / f"serve-{delay}.log").wait_ready()
                try:
                    result["latency"][f"{delay:g}"] = latency_run(bundle, server.url, args.after, data.images,
                                                                  args.timeout_ms / 1000, args.repeat)
                finally:
                    server.stop()
                row = result["latency"][f"{delay:g}"]
                print(f"delay {delay:g} ms: policy {row['policy']['vs_local']}, always {row['always']['vs_local']}",
                      file=sys.stderr)
            out = Path(args.out or ROOT / "benchmarks" / "results" / f"offload_{name}.json")
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {out}", file=sys.stderr)
        if args.only != "latency":
            path = Path(args.throughput_out)
            doc = json.loads(path.read_text()) if path.exists() else {}
            doc.update({"benchmark": "offload throughput", "created": created, "environment": environment,
                        "method": ("simulated boards: threads of one process, each with one keep-alive connection "
                                   "(the board's OffloadClient), sending real stage-K hand-offs (of the first 200 "
                                   "test images) as fast as answers come back, no injected delay; one `edgeexit "
                                   "serve` process (KServe 0.21, REST, one worker) per batching configuration, all "
                                   "started together and measured in turn (order rotating per round), boards and "
                                   "servers on the same cores; each row pools its rounds")})
            doc.setdefault("bundles", {})[name] = {
                "source": args.bundle, "after": args.after, "data": args.data, "seconds_per_round": args.seconds,
                "local_tail_ms": runner._tail_ms(args.after),
                "configurations": throughput(args, bundle, tmp, data.images)}
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {path}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
