"""Bearer-token checks: an admin token for registry writes, an optional one for generation.

Tokens come from the config or the environment (`PEFTSERVE_ADMIN_TOKEN`, `PEFTSERVE_API_TOKEN`); the
environment wins so a secret never has to sit in a YAML file. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def resolve_token(configured: str | None, env_var: str) -> str | None:
    token = os.environ.get(env_var) or configured
    return token or None


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and "localhost"; anything else (including an unknown peer) is the network."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


OPEN_ADMIN_FLAG = "--insecure-allow-open-admin"


def check_admin(expected: str | None, authorization: str | None, what: str, client_host: str | None,
                open_admin: bool) -> None:
    """Registry writes: the admin token when one is set. Without one, only loopback clients may write,
    unless the operator opened writes to the network on purpose (insecure_allow_open_admin)."""
    if expected is None and not open_admin and not is_loopback(client_host):
        raise AuthError(403, f"{what} from {client_host or 'a remote client'} is refused: this server has no "
                             "admin token, so registry writes are accepted from loopback only. Set "
                             f"PEFTSERVE_ADMIN_TOKEN on the server (or start it with {OPEN_ADMIN_FLAG})")
    check_bearer(expected, authorization, what)


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
