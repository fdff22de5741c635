"""Keys: who may use the relay, with which models, budgets and rate limit (`--keys FILE`).

The file is TOML, one table per key:

    [keys.alice]
    secret_sha256 = "9f86d0..."   # or: secret = "sk-relay-..." (the file need not hold it)
    budget_tokens = 50000          # billed tokens per period
    budget_cost = 2.50             # cost per period (currency, as the prices give it)
    period = "day"                 # "total" | "hour" | "day" | "month" (UTC calendar)
    tokens_per_minute = 10000      # refuse new requests while the last 60 s reached this
    models = ["gpt-4o-mini", "claude-*"]

Decisions, so that the reader need not guess:

- A key name is 1 to 64 ASCII letters, digits, `-` or `_` (a TOML bare key): it is printed in
  the ledger, in `/metrics` labels and in messages, and needs no quoting anywhere.
- `period` defaults to `"total"`: a budget that never resets. A file that forgets the period
  then stops spending rather than silently renewing it every day.
- `models` are fnmatch glob patterns (`*`, `?`, `[seq]`) matched case-insensitively, since
  providers treat `GPT-4o-mini` and `gpt-4o-mini` alike. Without `models` every model is
  allowed; with it, a request that names no model (a bare stream) is refused: an allow-list
  that a request escapes by leaving the model out would allow nothing at all. An empty list is
  an error (leave `models` out to allow every model).
- `budget_tokens = 0` (or `budget_cost = 0`) is allowed and refuses every request: a way to
  suspend a key. `tokens_per_minute` must be at least 1.
- A `secret` is visible ASCII without spaces: an HTTP header or query carries no other, so any
  other secret could never be presented. Only its SHA-256 is kept.
- Errors never quote a secret, a digest or any other value a secret might have been pasted
  into; they name the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

from sserelay.errors import ConfigError
from sserelay.metering.toml_lines import TomlLines

__all__ = [
    "ANONYMOUS",
    "SECRET_PREFIX",
    "Key",
    "KeyRing",
    "KeysFileError",
    "Period",
    "check_key_name",
    "new_key",
    "secret_digest",
]

#: The name of the one key that `--auth-token` makes; it names the option in the ledger.
ANONYMOUS = "auth-token"
#: What `new_key` secrets start with, so that a leaked one is recognisable (and greppable).
SECRET_PREFIX = "sk-relay-"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class Period(StrEnum):
    """How often a key's budget starts again: never, or at each UTC calendar hour/day/month."""

    TOTAL = "total"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class KeysFileError(ConfigError):
    """The keys file is not valid; the message is one line: `FILE:LINE: reason`.

    `path`, `line` (1-based) and `why` are kept apart for callers and tests. The message
    never holds a secret or a digest, only names of files, keys and fields.
    """

    def __init__(self, path: str, line: int, reason: str, column: int | None = None) -> None:
        where = f"{path}:{line}:" if column is None else f"{path}:{line}:{column}:"
        super().__init__(f"{where} {reason}", "keys")
        self.path = path
        self.line = line
        self.column = column
        self.why = reason


class _Invalid(ValueError):
    """A field's value is wrong; the text is the reason, without the value."""


# --------------------------------------------------------------------------- field checks
# One checker per field, used by the file reader (which adds the line) and by Key itself.


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a one-line message: escapes control characters, clips long text."""
    clipped = text if len(text) <= limit else text[: limit - 1] + "…"
    return repr(clipped)


def check_key_name(name: object) -> str:
    """`name` if it is a valid key name (1-64 of A-Z a-z 0-9 - _), else ValueError saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = _shown(name) if isinstance(name, str) else "this"
        raise _Invalid(f"key name {shown} is not 1 to 64 ASCII letters, digits, '-' or '_'")
    return name


def _check_secret(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("secret must be a string")
    if not _VISIBLE_ASCII.fullmatch(value):
        raise _Invalid(
            "secret must be visible ASCII characters without spaces "
            "(a client could not present any other)"
        )
    return value


def _check_digest(value: object) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        hint = ""
        if isinstance(value, str) and value.startswith(SECRET_PREFIX):
            hint = " (this looks like the secret itself: write it as `secret = ...`)"
        raise _Invalid(f"secret_sha256 must be 64 hexadecimal digits, a SHA-256 digest{hint}")
    return value.lower()


def _check_budget_tokens(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("budget_tokens must be a whole number of tokens")
    if value < 0:
        raise _Invalid("budget_tokens must not be negative")
    return value


def _check_budget_cost(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("budget_cost must be a number")
    if not math.isfinite(value):
        raise _Invalid("budget_cost must be a finite number (not nan or inf)")
    if value < 0:
        raise _Invalid("budget_cost must not be negative")
    return float(value)


def _check_period(value: object) -> Period:
    choices = ", ".join(period.value for period in Period)
    if not isinstance(value, str):
        raise _Invalid(f"period must be a string, one of {choices}")
    try:
        return Period(value)
    except ValueError:
        raise _Invalid(f"unknown period {_shown(value)}; use one of {choices}") from None


def _check_tokens_per_minute(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("tokens_per_minute must be a whole number of tokens")
    if value < 1:
        raise _Invalid("tokens_per_minute must be at least 1")
    return value


def _check_models(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(pattern, str) and pattern for pattern in value
    ):
        raise _Invalid("models must be a list of model names or glob patterns (non-empty strings)")
    if not value:
        raise _Invalid("models must not be empty; leave it out to allow every model")
    return tuple(value)


#: The fields of a key table, in the order their checks run, with their checker.
_FIELDS: dict[str, Callable[[object], object]] = {
    "secret": _check_secret,
    "secret_sha256": _check_digest,
    "budget_tokens": _check_budget_tokens,
    "budget_cost": _check_budget_cost,
    "period": _check_period,
    "tokens_per_minute": _check_tokens_per_minute,
    "models": _check_models,
}


def secret_digest(secret: str) -> str:
    """The lowercase hex SHA-256 of `secret` (UTF-8), as `secret_sha256` holds it.

    Lone surrogates (which no HTTP header can carry) are hashed as their code points rather
    than raising, so that any presented string gets a digest and simply matches no key.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class Key:
    """One client identity, with what it may use.

    `None` for a budget or for `tokens_per_minute` means no limit; an empty `models` means every
    model. The constructor checks every field as the file reader does (ValueError saying why).
    `secret_sha256` is left out of `repr`: a digest of a weak secret can be brute-forced.
    """

    name: str
    secret_sha256: str = field(repr=False)
    budget_tokens: int | None = None
    budget_cost: float | None = None
    period: Period = Period.TOTAL
    tokens_per_minute: int | None = None
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_key_name(self.name)
            object.__setattr__(self, "secret_sha256", _check_digest(self.secret_sha256))
            if self.budget_tokens is not None:
                _check_budget_tokens(self.budget_tokens)
            if self.budget_cost is not None:
                object.__setattr__(self, "budget_cost", _check_budget_cost(self.budget_cost))
            object.__setattr__(self, "period", _check_period(self.period))
            if self.tokens_per_minute is not None:
                _check_tokens_per_minute(self.tokens_per_minute)
            if self.models:
                object.__setattr__(self, "models", _check_models(self.models))
        except _Invalid as exc:
            raise ValueError(f"key {self.name!r}: {exc}") from None

    @property
    def limited(self) -> bool:
        """Whether any budget or rate limit applies to this key."""
        return (
            self.budget_tokens is not None
            or self.budget_cost is not None
            or self.tokens_per_minute is not None
        )

    def allows_model(self, model: str | None) -> bool:
        """Whether a request for `model` may use this key.

        No `models` list: every model, and a request that names none. With a list: the model
        must match one of its glob patterns, ignoring case; a request without a model is refused.
        """
        if not self.models:
            return True
        if not model:
            return False
        wanted = model.casefold()
        return any(fnmatchcase(wanted, pattern.casefold()) for pattern in self.models)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys a relay accepts, found by the secret a client presents.

    Names and secret digests must be unique (ValueError otherwise). An empty ring accepts nobody.
    """

    keys: tuple[Key, ...]
    _digests: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = tuple(self.keys)
        object.__setattr__(self, "keys", keys)
        names = [key.name for key in keys]
        if len(set(names)) != len(names):
            raise ValueError("two keys have the same name")
        digests = tuple(bytes.fromhex(key.secret_sha256) for key in keys)
        if len(set(digests)) != len(digests):
            raise ValueError("two keys have the same secret")
        object.__setattr__(self, "_digests", digests)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, name: str) -> Key | None:
        """The key called `name`, or None."""
        return next((key for key in self.keys if key.name == name), None)

    def find(self, presented: str) -> Key | None:
        """The key whose secret is `presented`, or None (also for an empty string).

        The presented secret is hashed once, then compared with every key's digest by
        `hmac.compare_digest`, without stopping at a match: the time taken says nothing about
        which key matched, nor how much of a digest did.
        """
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: Key | None = None
        for key, known in zip(self.keys, self._digests, strict=True):
            if hmac.compare_digest(digest, known):
                found = key
        return found if presented else None

    @classmethod
    def anonymous(cls, token: str) -> KeyRing:
        """The ring of `--auth-token TOKEN`: one key named ANONYMOUS, without any limit."""
        try:
            _check_secret(token)
        except _Invalid as exc:
            raise ValueError(str(exc).replace("secret", "the auth token", 1)) from None
        return cls((Key(ANONYMOUS, secret_digest(token)),))

    @classmethod
    def from_toml(cls, text: str, path: str) -> KeyRing:
        """Read a keys file; `path` is only used in messages. Raises KeysFileError."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _syntax_error(text, path, exc) from None
        lines = TomlLines(text)
        return cls(tuple(_read_keys(document, lines, path)))


def new_key(name: str) -> tuple[str, str]:
    """A fresh secret for key `name`, and the TOML lines to paste into the keys file.

    The secret is `sk-relay-` and 43 URL-safe characters (256 random bits). The lines hold its
    SHA-256, never the secret itself. A bad name raises ValueError.
    """
    check_key_name(name)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    return secret, f'[keys.{name}]\nsecret_sha256 = "{secret_digest(secret)}"\n'


# --------------------------------------------------------------------------- reading the file


def _syntax_error(text: str, path: str, exc: tomllib.TOMLDecodeError) -> KeysFileError:
    # Python 3.11's TOMLDecodeError has no lineno yet: its message ends in the position.
    message = str(exc)
    found = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if found:
        reason = message[: found.start()]
        return KeysFileError(path, int(found[1]), f"not valid TOML: {reason}", int(found[2]))
    reason = message.removesuffix(" (at end of document)")
    return KeysFileError(path, max(1, len(text.splitlines())), f"not valid TOML: {reason}")


def _read_keys(document: dict[str, Any], lines: TomlLines, path: str) -> Iterator[Key]:
    def fail(where: tuple[str, ...], reason: str) -> KeysFileError:
        return KeysFileError(path, lines.line_of(where), reason)

    for top in document:
        if top != "keys":
            raise fail((top,), f"unknown table or field {_shown(top)}; the file holds [keys.NAME]")
    table = document.get("keys")
    if table is None:
        raise fail((), "no keys: the file defines no [keys.NAME] table")
    if not isinstance(table, dict):
        raise fail(("keys",), "keys must hold one [keys.NAME] table per key")
    if not table:
        raise fail(("keys",), "no keys: [keys] holds no [keys.NAME] table")

    owners: dict[str, str] = {}  # digest -> the key that has it, for duplicate secrets
    for name, entry in table.items():
        where = ("keys", name)
        try:
            check_key_name(name)
        except _Invalid as exc:
            raise fail(where, str(exc)) from None
        if not isinstance(entry, dict):
            raise fail(where, f"[keys.{name}] must be a table of fields")
        for field_name in entry:
            if field_name not in _FIELDS:
                known = ", ".join(sorted(_FIELDS))
                raise fail(
                    (*where, field_name),
                    f"[keys.{name}] has an unknown field {_shown(field_name)}; known: {known}",
                )
        values: dict[str, Any] = {}
        for field_name, value in entry.items():
            try:
                values[field_name] = _FIELDS[field_name](value)
            except _Invalid as exc:
                raise fail((*where, field_name), f"[keys.{name}] {exc}") from None

        if "secret" in values and "secret_sha256" in values:
            later = max(("secret", "secret_sha256"), key=lambda f: lines.line_of((*where, f)))
            raise fail(
                (*where, later), f"[keys.{name}] gives both secret and secret_sha256; keep one"
            )
        if "secret" in values:
            digest, secret_field = secret_digest(values.pop("secret")), "secret"
        elif "secret_sha256" in values:
            digest, secret_field = values.pop("secret_sha256"), "secret_sha256"
        else:
            raise fail(where, f"[keys.{name}] needs secret or secret_sha256")
        if digest in owners:
            raise fail(
                (*where, secret_field),
                f"[keys.{name}] has the same secret as [keys.{owners[digest]}]",
            )
        owners[digest] = name
        yield Key(name=name, secret_sha256=digest, **values)
