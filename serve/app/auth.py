"""Bearer-token checks: an admin token for registry writes, an optional one for generation.

Tokens come from the config or the environment (`PEFTSERVE_ADMIN_TOKEN`, `PEFTSERVE_API_TOKEN`); the
environment wins so a secret never has to sit in a YAML file. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import os


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def resolve_token(configured: str | None, env_var: str) -> str | None:
    token = os.environ.get(env_var) or configured
    return token or None


def check_bearer(expected: str | None, authorization: str | None, what: str) -> None:
    """No-op when no token is configured; 401 when the header is missing, 403 when the token is wrong."""
    if expected is None:
        return
    if not authorization:
        raise AuthError(401, f"{what} requires 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, f"{what} requires 'Authorization: Bearer <token>' (got a {scheme!r} header)")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthError(403, f"the bearer token is not valid for {what}")
