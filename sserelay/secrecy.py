"""Secrets are never printed, logged or recorded: `Redactor` masks every configured one.

A credential can come back inside an upstream's error body ("Incorrect API key provided:
sk-…"), in a URL, in a header echoed by a debugging upstream: matching whole header values
is not enough. Every piece of text sserelay prints or records about a request goes through
`Redactor.redact()`, which replaces each configured secret wherever it occurs.
"""

from __future__ import annotations

from collections.abc import Iterable

#: What a secret is replaced with.
MASK = "***"
#: Shorter values are not masked: masking every "x" of a text would hide nothing and garble
#: everything (a secret this short is no secret).
MIN_SECRET_LENGTH = 4


def secret_parts(value: str) -> list[str]:
    """The secrets a configured credential holds: the value itself and, for an
    `Authorization`-style value (`Bearer sk-…`, `Basic …`), its token part."""
    value = value.strip()
    parts = [value]
    scheme, space, token = value.partition(" ")
    if space and token.strip() and scheme.isalpha():
        parts.append(token.strip())
    return parts


class Redactor:
    """Masks every secret it was given, longest first (so a secret that contains another is
    masked whole)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        found = {
            part
            for value in secrets
            for part in secret_parts(value)
            if len(part) >= MIN_SECRET_LENGTH
        }
        self._secrets = sorted(found, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def redact(self, text: str) -> str:
        """`text` with every secret replaced by `***`."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def redact_bytes(self, data: bytes) -> bytes:
        """The same for bytes (a recording's raw parts)."""
        for secret in self._secrets:
            raw = secret.encode()
            if raw in data:
                data = data.replace(raw, MASK.encode())
        return data
