"""Redaction of personal data in text before it is stored: e-mail addresses, card numbers and phone numbers.

Card numbers are redacted only when their digits pass the Luhn check, so order and reference numbers stay
readable; cards are matched before phones because a card number also looks like a long phone number.
Every pattern is bounded in length so that adversarial input cannot cause catastrophic backtracking.
"""

from __future__ import annotations

import hashlib
import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# A phone number must not be the middle of a longer digit run (a non-Luhn card or account number).
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .()-])\+?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .()-]{0,2}\d){6,14}(?!\w)(?![ .()-]{1,2}\d)"
)
DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2\d{2,4}")

EMAIL_TOKEN, CARD_TOKEN, PHONE_TOKEN = "[EMAIL]", "[CARD]", "[PHONE]"


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


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
