"""`--register URL`: post the finished adapter directory to a running server (serve.app.client does the HTTP)."""

from __future__ import annotations

from pathlib import Path

from training.errors import RegisterError


def register(url: str, name: str, path: Path, token: str | None = None, replace: bool = True) -> dict:
    """Register `path` under `name`; returns the server's adapter record. Raises RegisterError."""
    import httpx

    from serve.app.client import RegisterError as RefusedError
    from serve.app.client import register_adapter

    try:
        return register_adapter(url, name, str(path), token=token, replace=replace, progress=False)
    except httpx.HTTPError as e:
        raise RegisterError(f"could not reach {url} to register {name!r}: {e}. The adapter is saved at "
                            f"{path}; register it later with `peftserve register`.") from None
    except RefusedError as e:
        raise RegisterError(f"the server at {url} refused adapter {name!r}: {e}. The adapter is saved "
                            f"at {path}.") from None
