"""What the Serve controller knows about the running application."""

from __future__ import annotations

from ray import serve


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment name; empty when the controller cannot be asked."""
    try:
        status = serve.status()
    except Exception:
        return {}
    counts: dict[str, int] = {}
    for application in status.applications.values():
        for name, deployment in application.deployments.items():
            counts[name] = deployment.replica_states.get("RUNNING", 0)
    return counts
