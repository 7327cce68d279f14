"""The API-key check of vLLM's ``AuthenticationMiddleware``, for the routes
pdserve guards itself (see ``PDServeMiddleware._guarded``).

pdserve's middleware runs outside vLLM's, so without this a request without
a key would have its body read, and reach the producer; and routes outside
vLLM's guarded prefixes (pdserve's own, vLLM's ``/invocations``) would be
open. The accepted keys are read per request
from vLLM's parsed arguments, never stored by pdserve: keys stay out of
pdserve's settings, logs and child processes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Any

API_KEY_ENV_VAR = "VLLM_API_KEY"
UNAUTHORIZED = {"error": "Unauthorized"}


def accepted_keys(scope: dict) -> list[str]:
    """The keys vLLM accepts: ``--api-key`` wins over ``$VLLM_API_KEY``."""
    state = getattr(scope.get("app"), "state", None)
    configured: Any = getattr(getattr(state, "args", None), "api_key", None)
    return [key for key in (configured or [os.environ.get(API_KEY_ENV_VAR)]) if key]


def header_value(scope: dict, name: bytes) -> str | None:
    """Starlette's Headers.get: the first header of that name, latin-1."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def authorized(scope: dict) -> bool:
    """Whether the request may pass, decided as vLLM decides it."""
    keys = accepted_keys(scope)
    if not keys:
        return True
    header = header_value(scope, b"authorization")
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(given.encode("utf-8")).digest()
    match = False
    # Compare against every key, so the time taken does not tell which matched.
    for key in keys:
        expected = hashlib.sha256(key.encode("utf-8")).digest()
        match |= secrets.compare_digest(digest, expected)
    return match
