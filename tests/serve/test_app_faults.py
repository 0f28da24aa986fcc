"""The ingress's reply to every failure of a call to an engine replica (serve/app/ingress.py ray_failure):
Ray's and Serve's failures (a dead or unreachable replica or node, no healthy replica, back-pressure) are
retryable 503s with Retry-After and a message; an exception raised inside the replica is a 500 (a bug)."""

from __future__ import annotations

import pytest
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serve.app.http_errors import ErrorReply, headers_for
from serve.app.ingress import ray_failure


@pytest.mark.parametrize("exc", [
    ActorDiedError(),
    ActorUnavailableError("the actor's node died", b"\0" * 16),
    NodeDiedError("node lost"),
    WorkerCrashedError(),
    ReplicaUnavailableError("r1"),
    DeploymentUnavailableError(DeploymentID(name="EngineReplica", app_name="peftserve")),
    BackPressureError(num_queued_requests=10, max_queued_requests=10),
    RayTaskError("generate", "tb", ActorDiedError()),  # the replica's own call to a dead actor
], ids=lambda e: type(e).__name__)
def test_ray_failures_are_retryable_503s(exc):
    reply = ErrorReply(**ray_failure(exc))
    assert reply.status == 503 and reply.retry_after_s >= 1 and reply.message
    assert headers_for(reply)["Retry-After"].isdigit()


def test_an_exception_raised_inside_the_replica_is_a_500():
    reply = ErrorReply(**ray_failure(RayTaskError("generate", "tb", ZeroDivisionError("x"))))
    assert reply.status == 500 and reply.retry_after_s is None
