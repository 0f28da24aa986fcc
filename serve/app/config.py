"""AppConfig: the `args:` of the Serve config YAML (deploy/*.yaml), validated once by `app_builder`.

Ray-level settings (replicas, autoscaling, GPUs/CPUs per replica) live in the YAML's `deployments:`
section, where `serve run`/`serve deploy` expect them; everything peftserve-specific lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.engine import EngineConfig, default_home, parse_bytes


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig, description="base model, devices, limits, caches")
    registry_dir: str | None = Field(None, description="SQLite catalog + store; default $PEFTSERVE_HOME/registry. "
                                                       "Must be shared storage when replicas span nodes")
    registry_url: str | None = Field(None, description="catalog database: postgresql://user:pass@host:5432/db "
                                                       "(PEFTSERVE_REGISTRY_URL); unset: SQLite in registry_dir")
    store_url: str | None = Field(None, description="adapter store: s3://bucket/prefix (PEFTSERVE_STORE_URL; "
                                                    "endpoint and keys from the AWS chain); unset: registry_dir")
    node_cache_bytes: int = Field(20 << 30, ge=1 << 20, description="per-node disk cache of store objects "
                                                                   "(s3 stores), LRU; under registry_dir")
    admin_token: str | None = Field(None, description="bearer token for POST/DELETE /adapters "
                                                      "(PEFTSERVE_ADMIN_TOKEN overrides)")
    api_token: str | None = Field(None, description="optional bearer token for generation and reads "
                                                    "(PEFTSERVE_API_TOKEN overrides)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="cap on JSON request bodies (413 above)")
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="cap on an adapter upload (413 above)")
    allowed_source_dirs: list[str] | None = Field(
        None, description="directories that POST /adapters {source: <server path>} may read from (resolved: "
                          "symlinks and '..' cannot leave them). None: any directory, for loopback clients only "
                          "(peftserve serve sets [] when bound beyond loopback); []: server paths are refused")
    insecure_allow_open_admin: bool = Field(
        False, description="accept registry writes without an admin token from non-loopback clients")
    demo_adapters: bool | None = Field(None, description="register the demo adapters `peftserve train demo` "
                                                         "trained for this base at start; default: only with the "
                                                         "embedded base")
    adapter_metric_labels: list[str] = Field(default_factory=list, max_length=256,
                                             description="adapters that get their own metric label")
    metrics_push_interval_s: float = Field(1.0, gt=0, le=60)
    topology: Literal["split", "combined"] = Field(
        "split", description="split: an Ingress deployment answers HTTP and forwards to EngineReplica deployments "
                             "(adapter-aware routing; a dead engine replica is a 503 with Retry-After). combined: "
                             "each EngineReplica answers HTTP itself, one hop and one process fewer per request; "
                             "Ray's proxy picks the replica (by queue length, or by the serve_multiplexed_model_id "
                             "header where the client sends one). See docs/SERVING.md")
    residency_routing: bool = Field(True, description="route requests to replicas that recently served "
                                                      "their adapter (Ray multiplexed-model routing)")
    resident_adapters_hint: int = Field(64, ge=1, description="adapters each replica advertises as resident")

    @field_validator("max_body_bytes", "max_upload_bytes", "node_cache_bytes", mode="before")
    @classmethod
    def _bytes(cls, v):
        return parse_bytes(v)

    @field_validator("allowed_source_dirs")
    @classmethod
    def _dirs(cls, v):
        if v is None:
            return None
        resolved = []
        for d in v:
            p = Path(d).expanduser()
            if not p.is_absolute():
                raise ValueError(f"allowed_source_dirs: {d!r} is not an absolute path")
            resolved.append(str(p.resolve()))
        return resolved

    def registry_path(self) -> Path:
        return Path(self.registry_dir).expanduser() if self.registry_dir else default_home() / "registry"

    def open_registry(self):
        """The registry of this config: URLs from the config, else the environment, else local files."""
        from serve.registry import open_registry

        return open_registry(self.registry_path(), self.engine.max_adapter_file_bytes, self.registry_url,
                             self.store_url, self.node_cache_bytes)

    def wants_demo_adapters(self) -> bool:
        return self.engine.base is None if self.demo_adapters is None else self.demo_adapters
