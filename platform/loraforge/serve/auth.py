"""API keys for the model service: who may call it, which adapters each key may use, who may administer.

Replicas never hold a key in clear text: a key is kept as its SHA-256 digest, either computed where the
spec was read (`ApiKeyArg.key_sha256`) or read from an environment variable on the replica (`key_env`,
how a Kubernetes Secret reaches a RayService pod). The base model is open to every valid key; a key's
`adapters` list restricts adapters only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, model_validator

from loraforge.errors import SpecError
from loraforge.serve.engine.errors import RequestError


class AuthenticationError(RequestError):
    status = 401
    code = "invalid_api_key"


class PermissionDeniedError(RequestError):
    status = 403
    code = "model_not_allowed"


class AdminRequiredError(RequestError):
    status = 403
    code = "admin_required"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyArg(BaseModel):
    """An API key as deployment arguments carry it: an environment variable name or a digest, never the key."""

    model_config = ConfigDict(extra="forbid")

    name: str = "key"
    key_env: str | None = None
    key_sha256: str | None = None
    adapters: list[str] | None = None
    admin: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyArg:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError(f"API key {self.name!r}: give exactly one of key_env or key_sha256")
        return self


@dataclass(frozen=True)
class ApiKeyRule:
    name: str
    digest: str
    adapters: frozenset[str] | None  # None: every adapter
    admin: bool

    def may_use(self, model: str, base_names: Iterable[str]) -> bool:
        return self.adapters is None or model in self.adapters or model in base_names


class KeyRing:
    """The configured keys; an empty ring means the service is open (no key needed)."""

    def __init__(self, rules: Iterable[ApiKeyRule] = ()):
        self._by_digest = {r.digest: r for r in rules}

    @classmethod
    def from_args(cls, args: Iterable[ApiKeyArg], environ: Mapping[str, str] | None = None) -> KeyRing:
        env = os.environ if environ is None else environ
        rules = []
        for a in args:
            if a.key_env is not None:
                secret = env.get(a.key_env)
                if not secret:
                    raise SpecError("api_keys", [(a.name, f"environment variable {a.key_env} is not set on this "
                                                          "replica; it must hold the API key")])
                digest = key_digest(secret)
            else:
                digest = str(a.key_sha256)
            rules.append(ApiKeyRule(a.name, digest, None if a.adapters is None else frozenset(a.adapters), a.admin))
        return cls(rules)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, authorization: str | None) -> ApiKeyRule | None:
        """The caller's key from an `Authorization: Bearer <key>` header; None when no keys are configured."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Missing API key: send the header 'Authorization: Bearer <key>'")
        rule = self._by_digest.get(key_digest(token.strip()))
        if rule is None:
            raise AuthenticationError("Incorrect API key provided")
        return rule


def check_model_access(rule: ApiKeyRule | None, model: str, base_names: Iterable[str]) -> None:
    if rule is not None and not rule.may_use(model, base_names):
        raise PermissionDeniedError(f"API key {rule.name!r} may not use the model '{model}'", "model")


def check_admin(rule: ApiKeyRule | None, keys: KeyRing) -> None:
    """Admin routes need an admin key; with no keys configured they are open like every other route."""
    if keys.enabled and (rule is None or not rule.admin):
        raise AdminRequiredError("this route needs an admin API key")
