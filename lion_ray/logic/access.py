"""Who may call the served student: bearer keys, admin keys, and what reload may load.

Pure logic (no Ray, no web framework), so the rules are tested in milliseconds and the
replica is a thin shell around ``Access``. Replicas hold SHA-256 digests of the keys, never
the keys: the digests travel in the deployment's arguments (which Ray keeps in its control
store and shows in its dashboard), the keys stay in the environment they were read from.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import posixpath
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from lion_ray.errors import LionError


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_digests(environ: Mapping[str, str], variable: str, setting: str) -> list[str]:
    """The digests of the comma-separated keys in ``environ[variable]``; refuses (fails
    closed) when a configured variable is unset or holds no key."""
    keys = {k.strip() for k in environ.get(variable, "").split(",") if k.strip()}
    if not keys:
        raise LionError(
            f"serve.{setting} names ${variable}, but it is not set (or empty) in the process "
            f"that deploys the server (host {socket.gethostname()}, pid {os.getpid()}): "
            f"refusing to serve without the keys it names. Export {variable}=key1,key2 there "
            "(under `ray job submit` the job's driver runs on the head node: set it in the "
            "head node's environment, or from a Kubernetes secret in the RayService), or "
            f"remove serve.{setting} to serve without keys."
        )
    return sorted(key_digest(k) for k in keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """The key rules of one server. No user keys means an open server (loopback only,
    unless allowed on purpose); admin routes take admin keys only, or anyone on an open
    server with no admin keys configured."""

    user: frozenset[str] = field(default_factory=frozenset)
    admin: frozenset[str] = field(default_factory=frozenset)

    @property
    def open(self) -> bool:
        return not self.user

    @staticmethod
    def _bearer(header: str) -> str | None:
        return header[len("Bearer ") :] if header.startswith("Bearer ") else None

    @staticmethod
    def _holds(digests: frozenset[str], key: str | None) -> bool:
        if key is None:
            return False
        digest = key_digest(key)
        # compare against every digest, so timing says nothing about which one matched
        return any([hmac.compare_digest(digest, d) for d in digests])

    def check_user(self, header: str) -> int:
        """HTTP status for a user route: 200, or 401."""
        if self.open:
            return 200
        key = self._bearer(header)
        return 200 if self._holds(self.user, key) or self._holds(self.admin, key) else 401

    def check_admin(self, header: str) -> tuple[int, str]:
        """HTTP status (200, 401 or 403) and the reason for an admin route."""
        if not self.admin:
            if self.open:
                return 200, ""
            return 403, "admin routes are off on this server: set serve.admin_keys_env"
        key = self._bearer(header)
        if self._holds(self.admin, key):
            return 200, ""
        if self._holds(self.user, key):
            return 403, "this key may not use admin routes: send an admin key"
        return 401, "missing or invalid admin key: send 'Authorization: Bearer <admin key>'"


def _normalized(path: str) -> str:
    """A path or URI with '..' and '.' resolved (local paths also through symlinks)."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(path)


def within(path: str, roots: list[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or lies under one of them."""
    target = _normalized(path)
    for root in roots:
        base = _normalized(root).rstrip("/")
        if target == base or target.startswith(base + "/"):
            return True
    return False
