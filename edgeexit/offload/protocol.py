"""The offload wire format: one Open Inference Protocol (KServe v2) REST call per offloaded input.

The board posts the stage-K hand-off to ``/v2/models/<model>/infer``::

    {"id": "...", "parameters": {"bundle": FINGERPRINT, "rule": "<ExitRuleSpec JSON>"},
     "inputs": [{"name": "handoff", "datatype": "INT8", "shape": [1, h, w, c], "data": [...]}]}

and the server answers with the network's exit for it::

    {"model_name": ..., "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [label]},
        {"name": "exit_index", "datatype": "INT32", "shape": [1], "data": [exit]},
        {"name": "score", "datatype": "FP32", "shape": [1], "data": [score]},
        {"name": "probabilities", "datatype": "FP32", "shape": [1, K], "data": [...]},
        {"name": "logits", "datatype": "INT8", "shape": [1, K], "data": [...]}]}

``logits`` are the answering exit's raw integer outputs: the board recomputes score and probabilities from them
exactly as it does for a local answer, so a remote Result equals the local one bit for bit. ``bundle`` (a hash of
every stage file's sha256) makes a server hosting another bundle refuse the request; ``rule`` is the board's
current exit rule, so the tail decides as the board would. Only numpy and the standard library here: the board
and the server both import this module.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: The name of the tail model's one input.
INPUT_NAME = "handoff"
#: The tail model's outputs, in order, with their KServe v2 datatypes ("logits" takes the bundle's dtype).
OUTPUTS = (("label", "INT64"), ("exit_index", "INT32"), ("score", "FP32"), ("probabilities", "FP32"),
           ("logits", None))
#: numpy dtype name -> KServe v2 datatype, for hand-offs and raw logits.
DATATYPES = {"int8": "INT8", "int16": "INT16", "uint8": "UINT8"}
#: Rule kinds whose decisions at an exit depend on that exit's outputs only (no state carried between exits):
#: the only ones a tail that starts at stage K+1 can decide exactly as the board would.
STATELESS_RULES = ("confidence", "max_softmax", "entropy", "final", "fixed")


class ProtocolError(Exception):
    """An answer or a request that does not follow the wire format (one-line message)."""


def tail_model_name(bundle_name: str, after: int) -> str:
    """The KServe model name of the tail after stage ``after``: ``<bundle name>-after-<K>``, characters other
    than letters, digits, ``_ . -`` replaced by ``-`` (a URL path segment)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", bundle_name)[:64].strip("-.") or "bundle"
    return f"{safe}-after-{after}"


def bundle_fingerprint(stage_sha256: Sequence[str]) -> str:
    """16 hex digits naming the exact stage files (the manifest's sha256 of each, in order)."""
    return hashlib.sha256("\n".join(stage_sha256).encode()).hexdigest()[:16]


def offloadable(rule: dict[str, Any]) -> str | None:
    """Why the rule (an ExitRuleSpec's dict) cannot be decided on a tail, or None when it can."""
    kind, fallback = rule.get("kind"), rule.get("fallback", "final")
    if kind == "class_exclusion":
        return (f"rule {kind!r} carries state from exit to exit (its candidate classes), which the hand-off does not "
                f"hold; offload works with {', '.join(STATELESS_RULES)}")
    if kind not in STATELESS_RULES:
        return f"rule kind {str(kind)[:40]!r} is not one a tail runs ({', '.join(STATELESS_RULES)})"
    if fallback != "final":
        return (f"fallback {fallback!r} keeps the best exit so far, which the hand-off does not hold; offload works "
                "with fallback final")
    return None


def encode_request(handoff: np.ndarray, fingerprint: str, rule_json: str, request_id: str) -> bytes:
    """The JSON body of one infer request for ``handoff`` [1, h, w, c] int8 / int16."""
    body = {"id": request_id, "parameters": {"bundle": fingerprint, "rule": rule_json},
            "inputs": [{"name": INPUT_NAME, "datatype": DATATYPES[handoff.dtype.name],
                        "shape": list(handoff.shape), "data": handoff.ravel().tolist()}]}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RemoteAnswer:
    """What the server answered for one input: the network's exit and that exit's raw logits."""

    label: int
    exit_index: int
    logits: list[int]


def decode_answer(body: bytes, num_classes: int, first_exit: int, last_exit: int, logits_dtype: str) -> RemoteAnswer:
    """Read and check an infer response; ProtocolError (one line) unless it is a consistent answer.

    Args:
        body: the response body (already bounded in size by the caller).
        num_classes: K.
        first_exit, last_exit: the exits the tail can answer from (K+1 .. E-1).
        logits_dtype: the bundle's exit output dtype ("int8" or "int16").
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"answer is not JSON ({len(body)} bytes)") from None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list):
        raise ProtocolError("answer has no 'outputs' list")
    by_name = {o.get("name"): o for o in outputs if isinstance(o, dict)}
    info = np.iinfo(logits_dtype)
    label = _scalar(by_name, "label", "INT64")
    exit_index = _scalar(by_name, "exit_index", "INT32")
    logits = _ints(by_name, "logits", DATATYPES[logits_dtype], num_classes, info.min, info.max)
    if not first_exit <= exit_index <= last_exit:
        raise ProtocolError(f"answer's exit_index {exit_index} is outside the tail's exits {first_exit}..{last_exit}")
    if label != logits.index(max(logits)):
        raise ProtocolError(f"answer's label {label} is not the argmax of its logits")
    return RemoteAnswer(label=label, exit_index=exit_index, logits=logits)


def _tensor(by_name: dict[Any, Any], name: str, datatype: str) -> list[Any]:
    out = by_name.get(name)
    if out is None:
        raise ProtocolError(f"answer has no output {name!r}")
    if out.get("datatype") != datatype:
        raise ProtocolError(f"answer's {name!r} is {str(out.get('datatype'))[:20]!r}, expected {datatype}")
    data = out.get("data")
    if not isinstance(data, list):
        raise ProtocolError(f"answer's {name!r} has no data list")
    return data


def _scalar(by_name: dict[Any, Any], name: str, datatype: str) -> int:
    data = _tensor(by_name, name, datatype)
    if len(data) != 1 or type(data[0]) is not int:
        raise ProtocolError(f"answer's {name!r} is not one integer")
    return data[0]


def _ints(by_name: dict[Any, Any], name: str, datatype: str, n: int, lo: int, hi: int) -> list[int]:
    data = _tensor(by_name, name, datatype)
    if len(data) != n:
        raise ProtocolError(f"answer's {name!r} has {len(data)} values, expected {n} (wrong shape)")
    if any(type(v) is not int or not lo <= v <= hi for v in data):
        raise ProtocolError(f"answer's {name!r} holds values that are not {datatype} integers")
    return data
