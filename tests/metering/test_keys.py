"""Keys: the keys file (every bad file is one line naming file, line and reason), finding a
key by its secret in constant time, model allow-lists, and `keys new`."""

from __future__ import annotations

import ast
import hashlib
import hmac
import inspect
import re
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.errors import SSERelayError
from sserelay.metering.keys import (
    ANONYMOUS,
    SECRET_PREFIX,
    Key,
    KeyRing,
    KeysFileError,
    Period,
    check_key_name,
    new_key,
    secret_digest,
)

SECRET = "sk-relay-SEKRIT-alice"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
BOB_SECRET = "sk-relay-SEKRIT-bob"
BOB_DIGEST = hashlib.sha256(BOB_SECRET.encode()).hexdigest()


def load(text: str) -> KeyRing:
    return KeyRing.from_toml(textwrap.dedent(text).lstrip("\n"), "keys.toml")


def error_of(text: str) -> KeysFileError:
    with pytest.raises(KeysFileError) as caught:
        load(text)
    return caught.value


# --------------------------------------------------------------------------- good files


def test_a_full_file_reads_into_keys() -> None:
    ring = load(
        f"""
        [keys.alice]
        secret = "{SECRET}"
        budget_tokens = 50000
        budget_cost = 2.50
        period = "day"
        tokens_per_minute = 10000
        models = ["gpt-4o-mini", "claude-*"]

        [keys.bob]
        secret_sha256 = "{BOB_DIGEST.upper()}"
        """
    )
    alice, bob = ring.keys
    assert alice == Key(
        name="alice",
        secret_sha256=DIGEST,
        budget_tokens=50000,
        budget_cost=2.5,
        period=Period.DAY,
        tokens_per_minute=10000,
        models=("gpt-4o-mini", "claude-*"),
    )
    # the defaults: no limits, every model, a budget that never resets
    assert bob == Key("bob", BOB_DIGEST)
    assert (bob.budget_tokens, bob.budget_cost, bob.tokens_per_minute) == (None, None, None)
    assert bob.period is Period.TOTAL and bob.models == () and not bob.limited
    assert alice.limited
    assert ring.get("bob") is bob and ring.get("carol") is None and len(ring) == 2
    assert list(ring) == [alice, bob]


def test_every_toml_spelling_of_a_key_table_reads_the_same() -> None:
    spellings = [
        f'[keys.alice]\nsecret = "{SECRET}"\nbudget_tokens = 5\n',
        f'[keys]\nalice = {{ secret = "{SECRET}", budget_tokens = 5 }}\n',
        f'keys.alice.secret = "{SECRET}"\nkeys.alice.budget_tokens = 5\n',
        f'[ keys . "alice" ]\nsecret = "{SECRET}"  # a comment\nbudget_tokens = 5\n',
        f'[keys.alice]\nsecret = """{SECRET}"""\nbudget_tokens = 5\n',
        f"[keys.alice]\nsecret = '{SECRET}'\nbudget_tokens = 5\n",
        f'[keys.alice]\nsecret = "{SECRET}"\r\nbudget_tokens = 5\r\n',
    ]
    for text in spellings:
        assert KeyRing.from_toml(text, "k") == KeyRing((Key("alice", DIGEST, budget_tokens=5),))


def test_a_secret_is_only_kept_as_its_digest() -> None:
    (alice,) = load(f'[keys.alice]\nsecret = "{SECRET}"\n').keys
    assert alice.secret_sha256 == secret_digest(SECRET) == DIGEST
    assert SECRET not in repr(alice) and DIGEST not in repr(alice)


# --------------------------------------------------------------------------- bad files

HEAD = f'[keys.alice]\nsecret = "{SECRET}"\n'  # lines 1-2

BAD_FILES: list[tuple[str, str, int, str]] = [
    # (case, file text, the line named, a part of the reason)
    ("empty file", "", 1, "no keys"),
    ("only comments", "# nothing here\n\n# still nothing\n", 1, "no keys"),
    ("an empty [keys]", "# keys:\n[keys]\n", 2, "no keys"),
    ("toml syntax", HEAD + "budget_tokens = = 5\n", 3, "not valid TOML"),
    ("toml unclosed string", HEAD + 'period = "day\n', 3, "not valid TOML"),
    ("toml duplicate field", HEAD + "budget_tokens = 1\nbudget_tokens = 2\n", 4, "not valid TOML"),
    ("toml duplicate table", HEAD + "[keys.alice]\n", 3, "not valid TOML"),
    ("unknown top-level table", HEAD + "\n[server]\nport = 1\n", 4, "unknown table or field"),
    ("unknown top-level field", "budget = 5\n" + HEAD, 1, "unknown table or field"),
    ("keys not a table", "keys = 5\n", 1, "keys must hold"),
    ("keys an array of tables", f'[[keys]]\nsecret = "{SECRET}"\n', 1, "keys must hold"),
    ("a key not a table", "[keys]\nalice = 5\n", 2, "must be a table"),
    ("unknown field", HEAD + "budget_tokens = 5\nbudget = 5\n", 4, "unknown field 'budget'"),
    (
        "unknown field in an inline table",
        f'[keys]\n\nalice = {{ secret = "{SECRET}", budget = 1 }}\n',
        3,
        "unknown field 'budget'",
    ),
    (
        "unknown dotted field",
        f'keys.alice.secret = "{SECRET}"\n\nkeys.alice.limit = 3\n',
        3,
        "unknown field 'limit'",
    ),
    (
        "unknown field after strings and arrays that look like fields",
        HEAD
        + 'models = [\n  "a",  # budget = 1\n  """b\nbudget = 2""",\n  \'\'\'c\nx = 3\'\'\',\n]\n'
        + "budget = 3\n",
        10,
        "unknown field 'budget'",
    ),
    ("budget_tokens a string", HEAD + 'budget_tokens = "5"\n', 3, "budget_tokens must be a whole"),
    ("budget_tokens a float", HEAD + "budget_tokens = 5.0\n", 3, "budget_tokens must be a whole"),
    ("budget_tokens a bool", HEAD + "budget_tokens = true\n", 3, "budget_tokens must be a whole"),
    ("budget_tokens negative", HEAD + "budget_tokens = -1\n", 3, "must not be negative"),
    ("budget_cost a string", HEAD + 'budget_cost = "2.50"\n', 3, "budget_cost must be a number"),
    ("budget_cost negative", HEAD + "budget_cost = -0.5\n", 3, "must not be negative"),
    ("budget_cost nan", HEAD + "budget_cost = nan\n", 3, "finite"),
    ("budget_cost inf", HEAD + "budget_cost = inf\n", 3, "finite"),
    ("budget_cost -inf", HEAD + "budget_cost = -inf\n", 3, "finite"),
    ("period unknown", HEAD + 'period = "week"\n', 3, "unknown period 'week'"),
    ("period not a string", HEAD + "period = 1\n", 3, "period must be a string"),
    ("period in capitals", HEAD + 'period = "DAY"\n', 3, "unknown period 'DAY'"),
    ("tokens_per_minute zero", HEAD + "tokens_per_minute = 0\n", 3, "at least 1"),
    ("tokens_per_minute a float", HEAD + "tokens_per_minute = 1.5\n", 3, "whole number"),
    ("models a string", HEAD + 'models = "gpt-4o"\n', 3, "models must be a list"),
    ("models of numbers", HEAD + "models = [1]\n", 3, "models must be a list"),
    ("models with an empty name", HEAD + 'models = ["gpt", ""]\n', 3, "models must be a list"),
    ("models empty", HEAD + "models = []\n", 3, "must not be empty"),
    ("neither secret", "# alice\n[keys.alice]\nbudget_tokens = 5\n", 2, "needs secret or"),
    (
        "both secrets",
        HEAD + f'budget_tokens = 1\nsecret_sha256 = "{DIGEST}"\n',
        4,
        "both secret and secret_sha256",
    ),
    ("secret not a string", "[keys.alice]\nsecret = 12345\n", 2, "secret must be a string"),
    ("secret empty", '[keys.alice]\nsecret = ""\n', 2, "visible ASCII"),
    ("secret with a space", '[keys.alice]\nsecret = "sk-relay-SEKRIT x"\n', 2, "visible ASCII"),
    (
        "secret with a newline",
        '[keys.alice]\nsecret = """\nsk-relay-SEKRIT\n"""\n',
        2,
        "visible ASCII",
    ),
    ("sha256 too short", f'[keys.alice]\nsecret_sha256 = "{DIGEST[:-1]}"\n', 2, "64 hexadecimal"),
    ("sha256 not hex", f'[keys.alice]\nsecret_sha256 = "{"g" * 64}"\n', 2, "64 hexadecimal"),
    ("sha256 a secret", f'[keys.alice]\nsecret_sha256 = "{SECRET}"\n', 2, "secret itself"),
    (
        "duplicate secret",
        HEAD + f'\n[keys.bob]\nbudget_tokens = 1\nsecret_sha256 = "{DIGEST}"\n',
        6,
        "[keys.bob] has the same secret as [keys.alice]",
    ),
    ("bad key name", f'[keys."alice smith"]\nsecret = "{SECRET}"\n', 1, "key name 'alice smith'"),
    ("key name too long", f'[keys.{"a" * 65}]\nsecret = "{SECRET}"\n', 1, "1 to 64"),
    (
        "key name with a newline",
        f'[keys]\n"a\\nb" = {{ secret = "{SECRET}" }}\n',
        2,
        "key name 'a\\nb'",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_a_bad_file_is_one_line_naming_file_line_and_reason(
    text: str, line: int, reason: str
) -> None:
    with pytest.raises(KeysFileError) as caught:
        KeyRing.from_toml(text, "conf/keys.toml")
    error = caught.value
    assert isinstance(error, SSERelayError)
    assert error.line == line, str(error)
    assert error.path == "conf/keys.toml"
    assert reason in error.why
    message = str(error)
    assert re.fullmatch(rf"conf/keys\.toml:{line}:(\d+:)? .+", message), message
    assert "\n" not in message and "\r" not in message
    assert "SEKRIT" not in message  # no secret, whichever field it was put in
    assert DIGEST not in message and DIGEST[:16] not in message


def test_a_toml_syntax_error_names_the_column_too() -> None:
    error = error_of(HEAD + "budget_tokens = = 5\n")
    assert (error.line, error.column) == (3, 17)
    assert str(error).startswith("keys.toml:3:17: not valid TOML: ")


def test_an_error_in_the_last_line_without_a_newline_names_that_line() -> None:
    error = error_of(HEAD + "budget_tokens =")
    assert error.line == 3


@st.composite
def files_with_one_unknown_field(draw: st.DrawFn) -> tuple[str, int]:
    """A valid file of several keys in random spellings, with one unknown field whose line is
    known, and blank lines, comments and multi-line values that a line scanner could trip on."""
    count = draw(st.integers(1, 4))
    bad = draw(st.integers(0, count - 1))
    # root-level spellings first: after a [table] header, a line belongs to that table
    styles = sorted(
        draw(
            st.lists(st.sampled_from(["inline", "dotted", "table"]), min_size=count, max_size=count)
        ),
        key=lambda style: style == "table",
    )
    lines: list[str] = []
    for index, style in enumerate(styles):
        name = f"key{index}"
        secret = f'secret_sha256 = "{index:064x}"'
        fields = [secret, "budget_tokens = 7", 'models = [\n  "m-*",  # x = 1\n  "n",\n]']
        fields = draw(st.permutations(fields))
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(st.sampled_from(["", "# bogus = 1", '# [keys.x]\n# y = "z"'])))
        if index == bad:
            where = draw(st.integers(0, len(fields)))
            fields.insert(where, "bogus = 1")
        if style == "table":
            lines.append(f"[keys.{name}]")
            lines.extend(fields)
        elif style == "dotted":
            lines.extend(f"keys.{name}.{field}" for field in fields)
        else:
            inline = ", ".join(field.replace("\n", " ") for field in fields if "[" not in field)
            lines.append(f"keys.{name} = {{ {inline} }}")
    text = "\n".join(lines) + "\n"
    line = next(
        i
        for i, text_line in enumerate(text.split("\n"), 1)
        if "bogus = 1" in text_line and not text_line.startswith("#")
    )
    return text, line


@given(files_with_one_unknown_field())
def test_the_line_of_an_unknown_field_is_exact_in_any_layout(case: tuple[str, int]) -> None:
    text, line = case
    with pytest.raises(KeysFileError) as caught:
        KeyRing.from_toml(text, "k")
    assert caught.value.line == line
    assert "unknown field 'bogus'" in caught.value.why


# --------------------------------------------------------------------------- finding a key


def test_find_returns_the_key_whose_secret_is_presented() -> None:
    ring = load(f'[keys.alice]\nsecret = "{SECRET}"\n[keys.bob]\nsecret_sha256 = "{BOB_DIGEST}"\n')
    assert ring.find(SECRET) == ring.get("alice")
    assert ring.find(BOB_SECRET) == ring.get("bob")
    for wrong in ["", "sk-relay-", SECRET + " ", SECRET.upper(), DIGEST, "\udcff"]:
        assert ring.find(wrong) is None


def test_find_compares_every_digest_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing(tuple(Key(f"k{i}", secret_digest(f"secret-{i}")) for i in range(5)))
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest  # the module looks it up on each call, so patching hmac works

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in ["secret-0", "secret-4", "nobody"]:
        compared.clear()
        ring.find(presented)
        # every key is compared, also after the first one matched; digests, never secrets
        assert len(compared) == 5
        assert all(len(a) == len(b) == 32 for a, b in compared)


def test_find_has_no_early_exit_in_its_source() -> None:
    source = textwrap.dedent(inspect.getsource(KeyRing.find))
    assert "hmac.compare_digest" in source
    (loop,) = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.For)]
    assert not [
        node for node in ast.walk(loop) if isinstance(node, ast.Return | ast.Break | ast.Continue)
    ]
    assert " == " not in ast.unparse(loop)


def test_the_anonymous_ring_is_one_unlimited_key() -> None:
    ring = KeyRing.anonymous("s3cret")
    (key,) = ring.keys
    assert key.name == ANONYMOUS == "auth-token"
    assert not key.limited and key.models == () and key.period is Period.TOTAL
    assert ring.find("s3cret") is key and ring.find("s3cre") is None
    for bad in ["", "with space"]:
        with pytest.raises(ValueError, match="auth token"):
            KeyRing.anonymous(bad)


def test_a_ring_refuses_duplicate_names_and_secrets() -> None:
    with pytest.raises(ValueError, match="same name"):
        KeyRing((Key("a", DIGEST), Key("a", BOB_DIGEST)))
    with pytest.raises(ValueError, match="same secret"):
        KeyRing((Key("a", DIGEST), Key("b", DIGEST.upper())))
    assert KeyRing(()).find("anything") is None


# --------------------------------------------------------------------------- keys themselves


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        ((), "gpt-4o", True),
        ((), None, True),
        ((), "", True),
        (("gpt-4o-mini", "claude-*"), "gpt-4o-mini", True),
        (("gpt-4o-mini", "claude-*"), "GPT-4o-Mini", True),
        (("gpt-4o-mini", "claude-*"), "claude-sonnet-4-5", True),
        (("gpt-4o-mini", "claude-*"), "Claude-Opus", True),
        (("gpt-4o-mini", "claude-*"), "gpt-4o-mini-2024-07-18", False),
        (("gpt-4o-mini", "claude-*"), "gpt-4o", False),
        (("gpt-4o-mini", "claude-*"), "my-claude-x", False),
        (("gpt-4o-mini", "claude-*"), None, False),
        (("gpt-4o-mini", "claude-*"), "", False),
        (("gpt-4o-mini*",), "gpt-4o-mini-2024-07-18", True),
        (("gpt-?o",), "gpt-4o", True),
        (("gpt-[34]*",), "gpt-5", False),
    ],
)
def test_allows_model(models: tuple[str, ...], model: str | None, allowed: bool) -> None:
    assert Key("a", DIGEST, models=models).allows_model(model) is allowed


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "has space"},
        {"name": ""},
        {"secret_sha256": "abc"},
        {"budget_tokens": -1},
        {"budget_cost": float("nan")},
        {"budget_cost": -1.0},
        {"period": "week"},
        {"tokens_per_minute": 0},
        {"models": ("",)},
    ],
)
def test_a_key_checks_its_fields_as_the_file_does(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "a", "secret_sha256": DIGEST, **changes}
    with pytest.raises(ValueError):
        Key(**fields)  # type: ignore[arg-type]


def test_a_key_normalises_what_the_file_may_spell_loosely() -> None:
    key = Key("a", DIGEST.upper(), budget_cost=2, period="day", models=["x"])  # type: ignore[arg-type]
    assert key.secret_sha256 == DIGEST
    assert key.budget_cost == 2.0 and isinstance(key.budget_cost, float)
    assert key.period is Period.DAY and key.models == ("x",)
    assert hash(key) == hash(Key("a", DIGEST, budget_cost=2.0, period=Period.DAY, models=("x",)))


# --------------------------------------------------------------------------- keys new


def test_new_key_gives_a_secret_and_lines_that_read_back() -> None:
    secret, lines = new_key("alice")
    assert secret.startswith(SECRET_PREFIX) and len(secret) == len(SECRET_PREFIX) + 43
    assert re.fullmatch(r"[A-Za-z0-9_-]+", secret.removeprefix(SECRET_PREFIX))
    assert secret not in lines
    assert lines == f'[keys.alice]\nsecret_sha256 = "{secret_digest(secret)}"\n'
    ring = KeyRing.from_toml(lines, "pasted")
    assert ring.find(secret) == Key("alice", secret_digest(secret))
    assert new_key("alice")[0] != secret


@pytest.mark.parametrize("name", ["", "a b", "a.b", "ä", "x" * 65, "a\n"])
def test_new_key_refuses_a_bad_name(name: str) -> None:
    with pytest.raises(ValueError, match="key name"):
        new_key(name)
    with pytest.raises(ValueError):
        check_key_name(name)


def test_names_that_are_fine() -> None:
    for name in ["a", "alice", "ci-bot_2", "A" * 64]:
        assert check_key_name(name) == name
