"""Ed25519 signatures over an artifact's manifest.

A TVM artifact is native code: whoever can change one of its libraries can
also change the sha256 that the manifest lists for it. A detached signature
over ``manifest.json`` (which pins every file's sha256) ties the artifact to a
key instead: ``hatc translate --trust hatc.pub`` refuses an artifact that is
unsigned, signed by another key, or whose manifest changed after signing.

Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key) from
the ``cryptography`` package, imported only when signing or verifying, so the
runtime without ``--trust`` does not need it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatc import atomic
from hatc.errors import HatcError

SIGNATURE = "manifest.sig"  # beside manifest.json; the one file the manifest cannot list
SIGNATURE_FORMAT = "hatc-signature/1"
PRIVATE_KEY = "hatc.key"
PUBLIC_KEY = "hatc.pub"


class SigningError(HatcError):
    """A key is missing or malformed, or a signature does not verify."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError("signing and --trust need the cryptography package: pip install cryptography") from None
    return serialization, ed25519


def key_id(public_key: Any) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of sha256 of its raw bytes."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str


def generate_keys(out: Path, force: bool = False) -> KeyPair:
    """Writes a new Ed25519 key pair as ``out/hatc.key`` (mode 0600) and ``out/hatc.pub``.

    Raises:
        SigningError: a key file already exists there and ``force`` is false.
    """
    serialization, ed25519 = _crypto()
    out = Path(out)
    private_path, public_path = out / PRIVATE_KEY, out / PUBLIC_KEY
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise SigningError(f"{', '.join(existing)} already exist(s); pass --force to replace the key pair")
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The temp file is 0600 until complete: the private key is never readable by others.
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(private_path, private_pem, mode=0o600)
        atomic.write_bytes(public_path, public_pem, mode=0o644)
    except OSError as e:
        raise SigningError(f"--out {out}: cannot write the key pair there ({e.strerror}); choose another") from None
    return KeyPair(private_path, public_path, key_id(private.public_key()))


def _read_pem(path: Path, kind: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SigningError(f"{path}: no such {kind} key file (make a pair with 'hatc keys generate --out DIR')")
    return path.read_bytes()


def load_private_key(path: Path) -> Any:
    """An Ed25519 private key from a PEM file that ``hatc keys generate`` wrote."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(_read_pem(path, "private"), password=None)
    except (ValueError, TypeError):
        raise SigningError(
            f"{path}: not an unencrypted PEM private key (give the hatc.key that 'hatc keys generate' wrote)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{path}: not an Ed25519 private key (make one with 'hatc keys generate')")
    return key


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file (``hatc.pub``)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(_read_pem(path, "public"))
    except (ValueError, TypeError):
        raise SigningError(
            f"{path}: not a PEM public key (give the hatc.pub that 'hatc keys generate' wrote)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{path}: not an Ed25519 public key (make one with 'hatc keys generate')")
    return key


def signature_for(manifest_bytes: bytes, private_key: Any) -> bytes:
    """The contents of ``manifest.sig`` for these exact manifest bytes."""
    record = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
    }
    return (json.dumps(record, indent=1) + "\n").encode("utf-8")


def verify_signature(manifest_bytes: bytes, signature_path: Path, public_key: Any, source: Path) -> str:
    """Checks ``signature_path`` against the manifest's bytes and the trusted key; returns the key id.

    Raises:
        SigningError: unsigned, malformed signature file, another key, or a
            manifest changed after signing (each says which, naming ``source``).
    """
    signed = signature_path.is_file() and not signature_path.is_symlink()
    return verify_signature_bytes(manifest_bytes, signature_path.read_bytes() if signed else None, public_key, source)


def verify_signature_bytes(manifest_bytes: bytes, signature: bytes | None, public_key: Any, source: Path) -> str:
    """``verify_signature`` on the signature file's contents (None: the artifact has none)."""
    trusted = key_id(public_key)
    if signature is None:
        raise SigningError(
            f"{source}: not signed, and --trust needs an artifact signed by key {trusted} "
            "(compile it with 'hatc compile ... --sign hatc.key')"
        )
    try:
        record = json.loads(signature.decode("utf-8"))
        raw_signature = base64.b64decode(record["signature"], validate=True)
        signer = str(record["key_id"])
        if record.get("format") != SIGNATURE_FORMAT or record.get("algorithm") != "ed25519":
            raise ValueError("unknown format")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
        raise SigningError(f"{source}: {SIGNATURE} is not a hatc signature") from None
    if signer != trusted:
        raise SigningError(f"{source}: signed by key {signer}, not by the trusted key {trusted}")
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(raw_signature, manifest_bytes)
    except InvalidSignature:
        raise SigningError(
            f"{source}: the signature does not match manifest.json (changed after signing); refusing it"
        ) from None
    return trusted
