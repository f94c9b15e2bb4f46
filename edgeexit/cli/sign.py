"""``edgeexit keygen`` and ``edgeexit sign``: a producer's Ed25519 key pair and bundle signatures.

See :mod:`edgeexit.runtime.signing` for what a signature covers and how users require one.
"""

from __future__ import annotations

import click

from ..errors import printable


@click.command()
@click.argument("private_key", type=click.Path(dir_okay=False))
@click.argument("public_key", type=click.Path(dir_okay=False))
def keygen(private_key: str, public_key: str) -> None:
    """Write a new Ed25519 key pair: PRIVATE_KEY (keep it secret) and PUBLIC_KEY (give it to users)."""
    from ..runtime.signing import generate_key

    kid = generate_key(private_key, public_key)
    click.echo(f"key {kid}: private key {printable(private_key)} (mode 600), public key {printable(public_key)}")


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--key", "key", required=True, metavar="PRIVATE.pem", help="Ed25519 private key (PEM, unencrypted).")
def sign(bundle: str, key: str) -> None:
    """Check BUNDLE and sign its manifest.json (which holds every file's sha256) into manifest.sig.

    Sign again after anything rewrites the manifest (`edgeexit tune`).
    """
    from ..runtime.signing import key_id, load_private_key, sign_bundle

    private = load_private_key(key)
    path = sign_bundle(bundle, private)
    click.echo(f"signed {printable(path)} with key {key_id(private.public_key())}")


__all__ = ["keygen", "sign"]
