"""The API key: read once per router replica, fail closed, compared in constant time."""

from __future__ import annotations

import hmac
import os


class MissingApiKeyError(RuntimeError):
    """``router.api_key_env`` names a variable that this node lacks or has empty."""


def load_api_key(env_name: str | None) -> str | None:
    """The key in the environment variable ``env_name``; None when authentication is off
    (``env_name`` is None). A named variable that is missing or empty is an error, never
    authentication silently switched off on one node."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise MissingApiKeyError(
            f"router.api_key_env is {env_name!r}, but {env_name} is "
            f"{'empty' if env_name in os.environ else 'not set'} in this router's environment: "
            f"set {env_name} on every node (e.g. in the environment of `ray start`), or set "
            "router.api_key_env to null to run without authentication"
        )
    return key


def key_matches(token: str, expected: str) -> bool:
    """Whether ``token`` is the key, in constant time. Compared as bytes: any header text
    (non-ASCII included) is an answer, not a TypeError from ``hmac.compare_digest``."""
    return hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"),
        expected.encode("utf-8", "surrogateescape"),
    )
