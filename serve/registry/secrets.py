"""Credentials never leave the process: URLs are shown without passwords, messages are scrubbed.

Every message the registry builds from a backend error goes through `scrub`, which removes the
password of every URL it knows plus the AWS secret key of this process's environment.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

_KNOWN: set[str] = set()  # passwords of URLs this process opened (redacted wherever they appear)
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD")


def redact_url(url: str) -> str:
    """`scheme://user:***@host:port/path` (query strings dropped: they may carry tokens)."""
    parts = urlsplit(url)
    if parts.password:
        _KNOWN.add(parts.password)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}{':***' if parts.password else ''}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def scrub(text: object) -> str:
    """`text` without any password of a known URL, any `user:pw@` of a URL, or the AWS secret key."""
    out = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    secrets = set(_KNOWN) | {os.environ[k] for k in _SECRET_ENV if os.environ.get(k)}
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) >= 4:
            out = out.replace(s, "***")
    return out
