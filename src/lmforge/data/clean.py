"""Cleaning: repair and normalise text without changing what it says.

- Unicode repair with ftfy (mojibake, HTML entities in plain text) and NFC
  normalisation, for prose only: code keeps its exact characters.
- Control characters other than tab and newline are removed; CRLF / CR become LF.
- Trailing whitespace on each line is dropped and runs of 3+ blank lines collapse to 2.
- Project Gutenberg header (everything up to ``*** START OF ... ***``) and licence
  footer (from ``*** END OF ... ***``) are removed, both old and new marker styles.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except \t and \n (\r is handled as a line ending first).
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
BLANK_RUNS = re.compile(r"\n{4,}")

# Both styles: "*** START OF THE PROJECT GUTENBERG EBOOK X ***" (2020s) and
# "*** START OF THIS PROJECT GUTENBERG EBOOK X ***" (2004–2016); some files use
# fewer asterisks or "END OF THE PROJECT GUTENBERG EBOOK" with different casing.
GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$", re.I | re.M
)
GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$", re.I | re.M
)
# Older files end the text with this line before the licence.
GUTENBERG_END_OLD = re.compile(r"^End of (?:the )?Project Gutenberg'?s? ", re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove a Project Gutenberg header and footer; returns (text, whether it was one)."""
    start = GUTENBERG_START.search(text)
    end = GUTENBERG_END.search(text, start.end() if start else 0)
    if not start and not end:
        return text, False
    body = text[start.end() if start else 0 : end.start() if end else len(text)]
    old = GUTENBERG_END_OLD.search(body)
    if old:
        body = body[: old.start()]
    return body.strip("\n") + "\n", True


def normalise_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    text = TRAILING_SPACE.sub("", text)
    text = BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""


# Characters that ftfy fixes besides mojibake: C1 controls, surrogates, Unicode line
# separators, Latin ligatures, full-width forms.
FTFY_SUSPECT = re.compile(r"[\x80-\x9f\ud800-\udfff\u2028\u2029\ufb00-\ufb06\uff01-\uff5e]")


def fix_unicode(text: str) -> str:
    """ftfy repair, line by line, only where ftfy has something to fix; then NFC.

    Running ftfy on every line costs ~1 s/MB; its own `badness.is_bad` test plus a
    check for the other characters it rewrites selects the lines that need it, which
    gives the same result ~10x faster. Curly quotes are kept (``uncurl_quotes=False``):
    they are not damage.
    """
    import ftfy
    from ftfy.badness import is_bad

    if text.isascii() and "&" not in text:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.isascii():
            if "&" not in line:
                continue
        elif not (is_bad(line) or FTFY_SUSPECT.search(line) or "&" in line):
            continue
        lines[i] = ftfy.fix_text(line, normalization=None, uncurl_quotes=False)
    return unicodedata.normalize("NFC", "\n".join(lines))


def clean_text(
    text: str, is_code: bool, repair: bool = True, boilerplate: bool = True
) -> tuple[str, dict[str, int]]:
    """Clean one document's text; returns the text and counts of what was changed."""
    changes: dict[str, int] = {}
    if boilerplate and not is_code:
        text, stripped = strip_gutenberg(text)
        if stripped:
            changes["gutenberg_boilerplate"] = 1
    if repair and not is_code:
        fixed = fix_unicode(text)
        if fixed != text:
            changes["unicode_repaired"] = 1
        text = fixed
    norm = normalise_whitespace(text)
    if norm != text:
        changes["whitespace_normalised"] = 1
    return norm, changes
