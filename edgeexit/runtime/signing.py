"""Signed bundles: an Ed25519 signature over ``manifest.json``, made by the bundle's producer.

The manifest holds the size and sha256 of every file of the bundle, so a valid signature over its exact
bytes vouches for every byte of every file. The sha256 values alone only catch accidents (a truncated copy,
a flipped bit): whoever can edit a file can also update its hash in the manifest. A signature cannot be
updated without the producer's private key.

* The producer signs: ``edgeexit keygen producer.pem producer.pub.pem`` once, then ``edgeexit sign BUNDLE
  --key producer.pem`` (after ``convert``, and again after ``tune`` rewrites the manifest). The signature is
  written to ``BUNDLE/manifest.sig``.
* A user requires it: ``edgeexit run/info --trusted-key producer.pub.pem``, ``load_bundle(path,
  trusted_key=...)``, or the environment variable ``EDGEEXIT_TRUSTED_KEY`` (a public key file), which makes
  every load in the process (the Runner's, bench's and tune's too) refuse a bundle without a valid signature
  by that key. Without a trusted key, bundles load signed or not, as before.

Keys are PEM files: a PKCS#8 private key and a SubjectPublicKeyInfo public key, as ``openssl genpkey
-algorithm ed25519`` and ``openssl pkey -pubout`` also write them. The cryptography comes from the
``cryptography`` package (PyCA; wheels for x86-64 and aarch64; the optional ``sign`` extra); no edgeexit code
does any cryptography itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import BundleError, UsageError
from .files import read_regular

SIGNATURE_FILE = "manifest.sig"
SIGNATURE_FORMAT = "edgeexit-signature"
#: Environment variable naming a trusted public key file that every bundle load then requires.
TRUSTED_KEY_ENV = "EDGEEXIT_TRUSTED_KEY"
_KEY_FILE_BYTES = 16 << 10
_SIGNATURE_FILE_BYTES = 4 << 10
_INSTALL_HINT = "install the signing extra: pip install -c requirements/constraints.txt '.[sign]' (cryptography)"


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError(f"signed bundles need the cryptography package; {_INSTALL_HINT}") from None
    return ed25519


def _serialization() -> Any:
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


def _key_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return read_regular(path, _KEY_FILE_BYTES, f"{what} {os.fspath(path)!r}")
    except BundleError as exc:
        raise UsageError(str(exc).replace("re-copy the bundle", "check the key file")) from None


def load_public_key(key: Any) -> Any:
    """An Ed25519 public key: one already loaded, or a PEM file's path.

    Raises:
        UsageError: the file cannot be read, or holds no Ed25519 public key.
    """
    ed25519 = _ed25519()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if not isinstance(key, (str, os.PathLike)):
        raise UsageError(f"a trusted key must be a PEM file path or an Ed25519PublicKey, got {type(key).__name__}")
    data = _key_bytes(key, "public key")
    try:
        loaded = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError):
        raise UsageError(f"{os.fspath(key)!r}: not a PEM public key; give the .pub.pem file `edgeexit keygen` "
                         "wrote (or `openssl pkey -pubout` of an ed25519 key)") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise UsageError(f"{os.fspath(key)!r}: a {type(loaded).__name__}, not an Ed25519 public key")
    return loaded


def load_private_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 private key from an unencrypted PEM file.

    Raises:
        UsageError: the file cannot be read, or holds no unencrypted Ed25519 private key.
    """
    ed25519 = _ed25519()
    data = _key_bytes(path, "private key")
    try:
        key = _serialization().load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{os.fspath(path)!r}: not an unencrypted PEM private key; give the private key file "
                         "`edgeexit keygen` wrote (or `openssl genpkey -algorithm ed25519`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{os.fspath(path)!r}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def key_id(public_key: Any) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    s = _serialization()
    raw = public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 key pair (private key readable by its owner only); returns the key id.

    Raises:
        UsageError: either file exists already, or cannot be written.
    """
    ed25519, s = _ed25519(), _serialization()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    written = []
    try:
        for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except (OSError, ValueError) as exc:
        for path in written:
            os.unlink(path)
        reason = "it exists already" if isinstance(exc, FileExistsError) else getattr(exc, "strerror", None) or exc
        raise UsageError(f"cannot write the key pair ({reason}); choose new file names") from None
    return key_id(key.public_key())


def signature_for(manifest_bytes: bytes, private_key: Any) -> bytes:
    """The contents of ``manifest.sig`` for these exact manifest bytes."""
    doc = {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii")}
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def sign_bundle(bundle_dir: str | os.PathLike[str], private_key: str | os.PathLike[str] | Any) -> Path:
    """Sign ``bundle_dir/manifest.json`` as it is on disk; writes ``manifest.sig`` atomically.

    The bundle is fully validated first (files, hashes, graphs): only a bundle that loads gets a signature.

    Returns:
        The signature file's path.

    Raises:
        UsageError: a bad key. BundleError: a broken bundle, or the signature cannot be written.
    """
    from .bundle import load_bundle, replace_file_atomic
    from .manifest import MANIFEST_FILE

    key = private_key if not isinstance(private_key, (str, os.PathLike)) else load_private_key(private_key)
    bundle = load_bundle(bundle_dir, check_tensors=False, trusted_key=None)
    data = bundle.manifest_bytes
    if read_regular(bundle.path / MANIFEST_FILE, len(data), MANIFEST_FILE) != data:
        raise BundleError(f"{MANIFEST_FILE} changed while it was being signed; sign again")
    return replace_file_atomic(bundle.path, SIGNATURE_FILE, signature_for(data, key))


def verify_manifest(manifest_bytes: bytes, signature: bytes | None, trusted_key: Any) -> str:
    """Check ``signature`` (the bytes of ``manifest.sig``, None if absent) over ``manifest_bytes``.

    Returns:
        The key id of the trusted key that signed it.

    Raises:
        BundleError: no signature, a malformed one, one by another key, or one that does not match the manifest.
        UsageError: a bad trusted key.
    """
    public = load_public_key(trusted_key)
    kid = key_id(public)
    if signature is None:
        raise BundleError(f"the bundle is not signed (no {SIGNATURE_FILE}) and a trusted key ({kid}) is required; "
                          "ask its producer for a signed bundle (`edgeexit sign`)")
    try:
        doc = json.loads(signature.decode("ascii"))
        sig = base64.b64decode(doc["signature"], validate=True)
        ok_format = doc.get("format") == SIGNATURE_FORMAT and doc.get("algorithm") == "ed25519" and len(sig) == 64
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        ok_format = False
    if not ok_format:
        raise BundleError(f"{SIGNATURE_FILE}: not an edgeexit Ed25519 signature; re-sign the bundle")
    if doc.get("key_id") != kid:
        raise BundleError(f"{SIGNATURE_FILE}: signed by key {str(doc.get('key_id'))[:16]!r}, not by the trusted key "
                          f"{kid}; the bundle is not from the producer you trust")
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{SIGNATURE_FILE}: the signature does not match manifest.json (edited after signing, or "
                          "tuned without re-signing); re-sign the bundle or re-copy it from its producer") from None
    return kid


__all__ = ["SIGNATURE_FILE", "TRUSTED_KEY_ENV", "load_public_key", "load_private_key", "generate_key", "key_id",
           "sign_bundle", "signature_for", "verify_manifest"]
