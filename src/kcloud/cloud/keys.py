"""API keys: `kc_<id>_<secret>`, stored only as a SHA-256 digest, compared in constant time.

The id part finds the row; the digest of the whole key is compared with `hmac.compare_digest`,
so the time a check takes does not depend on how much of a guessed key is right. The secret is
32 random bytes (`secrets.token_urlsafe`), so a fast hash is enough (no password stretching).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_RE = re.compile(r"^kc_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str  # the row id: `k_<hex>`
    key: str  # the secret, shown once
    digest: str


def make_key() -> NewKey:
    hex_id = secrets.token_hex(8)
    key = f"kc_{hex_id}_{secrets.token_urlsafe(32)}"
    return NewKey(f"k_{hex_id}", key, digest(key))


def key_id(key: str) -> str | None:
    """The row id a presented key names, or None if it is not shaped like a key."""
    m = KEY_RE.match(key)
    return f"k_{m.group(1)}" if m else None


def matches(key: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(key), stored_digest)
