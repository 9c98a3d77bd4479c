"""Signed, expiring download links: what external_weights_urls and trace_export hand out.

A link names an object (a path the server made, such as "checkpoints/<id>/<file>") and an expiry
(unix seconds); its signature is HMAC-SHA256 over both, keyed by a secret that lives in the data
dir. Anyone holding the link may fetch the object until it expires, without an API key; changing
any part of it breaks the signature.

The secret is created once per data dir (file mode 0600) and shared by every server process that
uses the same data dir."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urlencode

log = logging.getLogger(__name__)

SECRET_FILE = "url-signing.key"
SECRET_BYTES = 32


class SignatureRejected(Exception):
    """The link is expired or does not carry a valid signature; the message says which."""


@functools.cache
def secret_for(data_dir: Path) -> bytes:
    """The data dir's signing secret, created on first use. Written to a private temp file and
    hard-linked into place, so concurrent first users never see a partial file and agree on one."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{SECRET_FILE}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            log.info("signing_secret_created", extra={"path": str(path)})
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    secret = path.read_bytes().strip()
    if len(secret) < SECRET_BYTES:
        raise RuntimeError(f"{path} holds no usable signing secret; remove it and it will be recreated")
    return secret


def signature(secret: bytes, object_path: str, expires: int) -> str:
    mac = hmac.new(secret, f"{object_path}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def signed_url(secret: bytes, base_url: str, object_path: str, expires: int) -> str:
    """`base_url` is where the download route lives (ending in '/'); the object path is appended."""
    query = urlencode({"expires": expires, "signature": signature(secret, object_path, expires)})
    return f"{base_url}{quote(object_path, safe='/')}?{query}"


def verify(secret: bytes, object_path: str, expires: int, sig: str, *, now: float | None = None) -> None:
    """Raise SignatureRejected unless `sig` signs (object_path, expires) and the link has not expired.
    The signature is checked first: an expiry someone edited is a bad signature, not an expiry."""
    if not hmac.compare_digest(signature(secret, object_path, expires).encode(), sig.encode()):
        raise SignatureRejected("this download link's signature is invalid (was the URL changed?)")
    if (time.time() if now is None else now) >= expires:
        raise SignatureRejected("this download link has expired; ask the API for a new one")
