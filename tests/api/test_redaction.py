"""Personal data is redacted before storage; ordinary numbers (dates, order numbers, non-Luhn digits) are kept;
speaker names and conversation ids that hold personal data are stored as keyed pseudonyms."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.redaction import (
    CARD_TOKEN,
    EMAIL_TOKEN,
    OFF,
    PHONE_TOKEN,
    PSEUDONYM,
    Redaction,
    load_or_create_key,
    luhn_valid,
    pseudonym,
    redact,
    redaction_from_settings,
)
from core.settings import Settings


def _with_luhn_check_digit(body: str) -> str:
    return next(body + digit for digit in "0123456789" if luhn_valid(body + digit))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe+billing@example.co.uk today", f"write to {EMAIL_TOKEN} today"),
        ("card 4111 1111 1111 1111, exp 12/27", f"card {CARD_TOKEN}, exp 12/27"),
        ("card 4111-1111-1111-1111", f"card {CARD_TOKEN}"),
        ("call +44 20 7946 0958 or (555) 123-4567", f"call {PHONE_TOKEN} or {PHONE_TOKEN}"),
        ("my number is 555.123.4567.", f"my number is {PHONE_TOKEN}."),
    ],
)
def test_personal_data_is_replaced_by_tokens(text: str, expected: str) -> None:
    assert redact(text) == (expected, True)


@pytest.mark.parametrize(
    "text",
    [
        "order 12345 shipped on 2024-01-02 or 02/01/2024",
        "reference 4111 1111 1111 1112",  # 16 digits, fails the Luhn check: not a card, and too long for a phone
        "account 12345678901234567890123",
        "version 1.2.3, pin 1234, year 2023",
        "I am so happy today!",
    ],
)
def test_ordinary_text_and_numbers_are_kept(text: str) -> None:
    assert redact(text) == (text, False)


@settings(max_examples=100, deadline=None)
@given(body=st.text(alphabet="0123456789", min_size=12, max_size=18), separator=st.sampled_from(["", " ", "-"]))
def test_every_luhn_valid_card_number_is_redacted(body: str, separator: str) -> None:
    number = _with_luhn_check_digit(body)
    spaced = separator.join(number[i : i + 4] for i in range(0, len(number), 4))
    redacted, changed = redact(f"my card is {spaced} thanks")
    assert changed and spaced not in redacted and not any(char.isdigit() for char in redacted)


@settings(max_examples=100, deadline=None)
@given(
    user=st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}", fullmatch=True),
    domain=st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,8}){0,2}\.[a-z]{2,6}", fullmatch=True),
)
def test_every_email_is_redacted(user: str, domain: str) -> None:
    address = f"{user}@{domain}"
    redacted, changed = redact(f"contact: {address}.")
    assert changed and address not in redacted and "@" not in redacted


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_redaction_is_idempotent_and_never_adds_personal_data(text: str) -> None:
    once, _ = redact(text)
    assert redact(once) == (once, False)


KEY = b"a deployment's key, 32 bytes ok"


def test_an_identifier_holding_personal_data_becomes_its_keyed_pseudonym_and_others_are_kept() -> None:
    redaction = Redaction(enabled=True, key=KEY)
    phone = redaction.identifier("+44 20 7946 0958")
    assert phone == pseudonym("+44 20 7946 0958", KEY) and PSEUDONYM.fullmatch(phone or "")
    assert redaction.identifier("+44 20 7946 0958") == phone  # stable: a caller's turns stay together
    assert Redaction(enabled=True, key=b"another key of 16+ bytes").identifier("+44 20 7946 0958") != phone
    assert redaction.identifier("agent") == "agent" and redaction.identifier("call-2024-17") == "call-2024-17"
    assert redaction.identifier(None) is None
    assert redaction.identifier(phone) == phone  # redacting twice changes nothing more


def test_every_identifier_is_pseudonymised_when_asked_and_none_when_redaction_is_off() -> None:
    every = Redaction(enabled=True, key=KEY, every_identifier=True)
    assert every.identifier("Rachel Green") == pseudonym("Rachel Green", KEY)
    assert OFF.identifier("ann@example.com") == "ann@example.com"
    assert OFF.text("ann@example.com") == ("ann@example.com", False)
    with pytest.raises(ValueError, match="16 bytes"):
        Redaction(enabled=True, key=b"short")


def test_the_pseudonym_key_is_created_once_owner_only_and_shared_by_processes_starting_together(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "pseudonym.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(path), range(32)))
    assert len(keys) == 1 and len(keys.pop()) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["pseudonym.key"]  # no partial files left behind


def test_settings_choose_the_key_and_turn_redaction_off(tmp_path: Path) -> None:
    assert redaction_from_settings(Settings(state_dir=tmp_path, redact_text=False)) is OFF
    given = redaction_from_settings(Settings(state_dir=tmp_path, pseudonym_key="k" * 24))
    assert given.key == b"k" * 24 and not (tmp_path / "pseudonym.key").exists()
    kept = redaction_from_settings(Settings(state_dir=tmp_path, pseudonymise_identifiers=True))
    assert kept.every_identifier and kept.key == load_or_create_key(tmp_path / "pseudonym.key")
