"""API keys: when ``REID_API_KEYS`` is set, requests need a matching ``X-API-Key`` header."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required when the service has REID_API_KEYS set."
)


def _digest(key: bytes) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of the keys' lengths.
    return hashlib.sha256(key).digest()


def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> None:
    """Accept the request if no keys are configured or ``key`` matches one, in constant time."""
    allowed: list[bytes] = request.app.state.api_key_digests
    if not allowed:
        return
    if not key:
        raise HTTPException(401, "missing X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
    given = _digest(key.encode())
    ok = False
    for digest in allowed:  # no early exit: every key is compared
        ok |= hmac.compare_digest(digest, given)
    if not ok:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "X-API-Key"})


def key_digests(keys: list[bytes]) -> list[bytes]:
    return [_digest(k) for k in keys]
