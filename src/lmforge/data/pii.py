"""PII redaction: find personal data and secrets, replace them with typed placeholders.

Types and how each is confirmed beyond its pattern (to keep false positives down):

=============  ============================  ==========================================
type           placeholder                   check
=============  ============================  ==========================================
SECRET         ``<SECRET>``                  known key formats (AWS, GitHub, Slack,
                                             OpenAI, Google, private-key blocks) and
                                             ``key/secret/token/password = "…"`` values
EMAIL          ``<EMAIL>``                   pattern
IBAN           ``<IBAN>``                    ISO 13616 mod-97 checksum
CREDIT_CARD    ``<CREDIT_CARD>``             12–19 digits passing the Luhn checksum
IP_ADDRESS     ``<IP_ADDRESS>``              parses as IPv4/IPv6; private, loopback and
                                             documentation ranges are left alone
PHONE          ``<PHONE>``                   7–15 digits with phone-like separators,
                                             not a date or a version number
=============  ============================  ==========================================

Matches are found in that order of priority and never overlap.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {
    "SECRET": "<SECRET>",
    "EMAIL": "<EMAIL>",
    "IBAN": "<IBAN>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "PHONE": "<PHONE>",
}

# (literal that every match contains, pattern): the literal gates the slower regex scan.
SECRET_PATTERNS = [
    (
        "-----BEGIN",
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    ),
    ("AKIA", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),  # AWS access key id
    ("ASIA", re.compile(r"\bASIA[0-9A-Z]{16}\b")),  # AWS temporary key id
    (
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    ),  # GitHub tokens
    ("github_pat_", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}\b")),
    ("xox", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),  # Slack
    ("sk-", re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b")),  # OpenAI-style
    ("AIza", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),  # Google API key
    ("hf_", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),  # Hugging Face
]
# `api_key = "..."`, `"password": "..."`: only the quoted value is redacted.
SECRET_ASSIGNMENT = re.compile(
    r"""(?ix)(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)
        ["']?\s*[:=]\s*["']([^"'\s]{8,})["']"""
)
EMAIL = re.compile(
    r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){11,18}\d(?![\d-])")
IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
IPV6 = re.compile(
    r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,6}|[0-9A-Fa-f]{1,4})(?![:\w])"
)
PHONE = re.compile(
    r"""(?x)(?<![\w+.-])
    (?:\+\d{1,3}[\s.-]?)?           # country code
    (?:\(\d{1,4}\)[\s.-]?)?         # area code in brackets
    \d{2,5}(?:[\s.-]\d{2,5}){1,4}   # groups separated by space, dot or dash
    (?:\s?(?:x|ext\.?)\s?\d{1,5})?  # extension
    (?!\w|-\d|\.\d)"""
)
PHONE_PLAIN = re.compile(r"(?<![\w.])(?:\+\d{10,14}|\d{7,12})(?![\w.])")
# Shapes that look like phone numbers but are dates, times or US social security numbers.
NOT_PHONE = re.compile(
    r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$|^\d{3}-\d{2}-\d{4}$"
)
# A phone keyword shortly before a number makes a weaker shape acceptable.
PHONE_CONTEXT = re.compile(r"(?i)(?:phone|tel|fax|mobile|cell|call|whatsapp|contact)\W{0,20}$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _public_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    # Most of IPv6 is formally "reserved" (unassigned) yet appears in real data; skip that test there.
    reserved = ip.is_reserved and ip.version == 4
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_unspecified
        or reserved
        or ip.is_multicast
        or ip.is_link_local
    )


# Every digit-bearing type (IBAN, card, IPv4, phone) contains a run like this; the full
# patterns run only in windows around such runs. A pattern that starts with a character
# class is scanned by `re` much faster than one that starts with a look-behind, so this
# pre-pass makes redaction several times faster on prose with few numbers.
DIGIT_RUN = re.compile(r"\d[\d\s().+/-]{4,}\d")
ASSIGNMENT_HINTS = ("key", "secret", "token", "passw")
IPV6_HINT = re.compile(r"[0-9A-Fa-f]{1,4}::?[0-9A-Fa-f]{1,4}:")
WINDOW = 48


def _digit_windows(text: str) -> list[tuple[int, int]]:
    windows: list[tuple[int, int]] = []
    for m in DIGIT_RUN.finditer(text):
        a, b = max(0, m.start() - WINDOW), min(len(text), m.end() + WINDOW)
        if windows and a <= windows[-1][1]:
            windows[-1] = (windows[-1][0], b)
        else:
            windows.append((a, b))
    return windows


def _keyword_windows(
    lower: str, keywords: tuple[str, ...], before: int = 20, after: int = 300
) -> list[tuple[int, int]]:
    """Merged windows around each keyword occurrence (str.find is a fast C scan)."""
    spans = []
    for kw in keywords:
        pos = lower.find(kw)
        while pos != -1:
            spans.append((max(0, pos - before), min(len(lower), pos + after)))
            pos = lower.find(kw, pos + 1)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans, by priority then position."""
    taken: list[tuple[int, int, str]] = []

    def add(a: int, b: int, kind: str) -> None:
        if all(b <= s or a >= e for s, e, _ in taken):
            taken.append((a, b, kind))

    for hint, pat in SECRET_PATTERNS:
        hints = hint if isinstance(hint, tuple) else (hint,)
        for a, b in _keyword_windows(text, hints, before=0, after=4096):
            for m in pat.finditer(text, a, b):
                add(m.start(), m.end(), "SECRET")
    lower = text.lower()
    for a, b in _keyword_windows(lower, ASSIGNMENT_HINTS):
        for m in SECRET_ASSIGNMENT.finditer(text, a, b):
            add(m.start(1), m.end(1), "SECRET")
    for a, b in _keyword_windows(text, ("@",), before=64, after=256):
        for m in EMAIL.finditer(text, a, b):
            add(m.start(), m.end(), "EMAIL")
    windows = _digit_windows(text)
    for a, b in windows:
        for m in IBAN.finditer(text, a, b):
            if iban_valid(m.group()):
                add(m.start(), m.end(), "IBAN")
    for a, b in windows:
        for m in CARD.finditer(text, a, b):
            digits = re.sub(r"\D", "", m.group())
            if 12 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1:
                add(m.start(), m.end(), "CREDIT_CARD")
    for a, b in windows:
        for m in IPV4.finditer(text, a, b):
            if _public_ip(m.group()):
                add(m.start(), m.end(), "IP_ADDRESS")
    if ":" in text and IPV6_HINT.search(text):
        for m in IPV6.finditer(text):
            if _public_ip(m.group()):
                add(m.start(), m.end(), "IP_ADDRESS")
    for a, b in windows:
        for pat in (PHONE, PHONE_PLAIN):
            for m in pat.finditer(text, a, b):
                value = m.group().strip()
                digits = re.sub(r"\D", "", value.split("x")[0].split("ext")[0])
                if not 7 <= len(digits) <= 15 or NOT_PHONE.match(value):
                    continue
                # A phone-like shape ('+', brackets, two separators) or a keyword before it.
                shaped = "+" in value or "(" in value or len(re.findall(r"[\s.-]", value)) >= 2
                if not shaped and not PHONE_CONTEXT.search(
                    text[max(0, m.start() - 30) : m.start()]
                ):
                    continue
                add(m.start(), m.start() + len(m.group().rstrip()), "PHONE")
    return sorted(taken)


def redact(text: str) -> tuple[str, Counter[str]]:
    """Replace every PII span with its placeholder; returns the text and counts by type."""
    spans = find_pii(text)
    if not spans:
        return text, Counter()
    out, pos = [], 0
    counts: Counter[str] = Counter()
    for start, end, kind in spans:
        out.append(text[pos:start])
        out.append(PLACEHOLDERS[kind])
        counts[kind] += 1
        pos = end
    out.append(text[pos:])
    return "".join(out), counts
