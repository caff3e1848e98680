"""Redaction of personal data before it is stored: e-mail addresses, card numbers and phone numbers in text, and
speaker names and conversation ids replaced by keyed pseudonyms.

An identifier cannot be redacted in place like text: `[PHONE]` as the conversation id of every call from a phone
number would merge them all. It is replaced whole by its pseudonym, an HMAC-SHA256 of the value under the
deployment's key: the same value gives the same pseudonym (a conversation's turns stay together, a speaker's turns
stay that speaker's), and without the key it cannot be reversed by trying every phone number. Identifiers in which
redaction finds nothing are kept as given unless every identifier is to be pseudonymised (names are not detected).

Card numbers are redacted only when their digits pass the Luhn check, so order and reference numbers stay
readable; cards are matched before phones because a card number also looks like a long phone number.
Every pattern is bounded in length so that adversarial input cannot cause catastrophic backtracking.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings

EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# A phone number must not be the middle of a longer digit run (a non-Luhn card or account number).
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .()-])\+?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .()-]{0,2}\d){6,14}(?!\w)(?![ .()-]{1,2}\d)"
)
DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2\d{2,4}")

EMAIL_TOKEN, CARD_TOKEN, PHONE_TOKEN = "[EMAIL]", "[CARD]", "[PHONE]"
TOKENS = (EMAIL_TOKEN, CARD_TOKEN, PHONE_TOKEN)
PSEUDONYM_PREFIX = "anon-"
PSEUDONYM_HEX = 20  # 80 bits: no two of a deployment's identifiers share one in practice
PSEUDONYM = re.compile(rf"{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}")
KEY_BYTES = 32


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(char for char in text if char.isdecimal())


def _card(match: re.Match[str]) -> str:
    return CARD_TOKEN if luhn_valid(_digits(match.group())) else match.group()


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    return PHONE_TOKEN if 7 <= len(_digits(text)) <= 15 and not DATE.fullmatch(text) else text


def redact(text: str) -> tuple[str, bool]:
    """The text with personal data replaced by tokens, and whether anything was replaced."""
    redacted = EMAIL.sub(EMAIL_TOKEN, text)
    redacted = CARD.sub(_card, redacted)
    redacted = PHONE.sub(_phone, redacted)
    return redacted, redacted != text


def holds_redaction(text: str) -> bool:
    """Whether redacted text has a token where personal data was."""
    return any(token in text for token in TOKENS)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pseudonym(value: str, key: bytes) -> str:
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:PSEUDONYM_HEX]


@dataclass(frozen=True)
class Redaction:
    """What is redacted in a row before it is stored (the prediction row, a call's speakers): off, or the text
    redacted and the identifiers that need it pseudonymised under `key` (every identifier when `every_identifier`)."""

    enabled: bool
    key: bytes = b""
    every_identifier: bool = False

    def __post_init__(self) -> None:
        if self.enabled and len(self.key) < 16:
            raise ValueError("a pseudonym key needs at least 16 bytes")

    def text(self, text: str | None) -> tuple[str | None, bool]:
        """The text as stored and whether redaction changed it."""
        if text is None or not self.enabled:
            return text, False
        return redact(text)

    def identifier(self, value: str | None) -> str | None:
        """A speaker name or conversation id as stored. A pseudonym is kept as it is, so that redacting twice (a
        call's speakers at upload, then its turns' rows) changes nothing more."""
        if value is None or not self.enabled or PSEUDONYM.fullmatch(value):
            return value
        if self.every_identifier or redact(value)[1]:
            return pseudonym(value, self.key)
        return value


OFF = Redaction(enabled=False)
KEY_FILE = "pseudonym.key"


def redaction_from_settings(settings: Settings) -> Redaction:
    if not settings.redact_text:
        return OFF
    if settings.pseudonym_key is not None:
        key = settings.pseudonym_key.get_secret_value().encode("utf-8")
    else:
        key = load_or_create_key(settings.state_dir / KEY_FILE)
    return Redaction(enabled=True, key=key, every_identifier=settings.pseudonymise_identifiers)


def load_or_create_key(path: Path) -> bytes:
    """The pseudonym key kept at `path`, created (random, owner-only) the first time. The key is written whole to a
    file of this process and linked into place, so that two processes creating it at once end up with one key and a
    reader never sees a half-written one."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        own = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(own, path)
        except FileExistsError:
            pass
        finally:
            own.unlink()
    return bytes.fromhex(path.read_text(encoding="ascii").strip())
