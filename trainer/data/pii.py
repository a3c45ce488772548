"""PII scrubbing of training text: emails, IP addresses, card numbers and phone numbers become
``[EMAIL]``, ``[IP]``, ``[CARD]`` and ``[PHONE]``, with counts of each (never the text) for the run's report.
"""

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

PII_KINDS = ("email", "phone", "ip", "card")

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
)
# Candidates only: ipaddress decides, so clock times (12:30:45) and MAC addresses are left alone.
# Bounded repetition keeps a long run of hex and colons from backtracking for ages.
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,8}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Exactly four dotted octets, so version strings (2.13.0, v1.2.3.4.5) and prices don't match.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
# A run of digit groups joined by single spaces or dashes; _card_end finds card numbers inside it.
_DIGIT_RUN = re.compile(r"(?<![\w.,+-])\d+(?:[ -]\d+)*(?![\w-]|[.,]\d)")
# Phone numbers need a shape numbers in prose don't have: a leading +, an area code in brackets,
# 3-3-4 groups with one separator, or a national trunk 0 followed by separated groups.
_PHONE = re.compile(
    r"""
    (?<![\w+.,/-])
    (?:
        \+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,5}   # +44 20 7946 0958, +1 (415) 555-2671
      | \(\d{2,5}\)[ .-]?\d{3,4}[ .-]?\d{3,4}                   # (415) 555-2671
      | (?:1[ .-])?\d{3}(?P<sep>[ .-])\d{3}(?P=sep)\d{4}        # 415-555-2671, 1-800-555-0199
      | 0[1-9](?P<pair>[ .])\d{2}(?:(?P=pair)\d{2}){3}          # 01 23 45 67 89
      | 0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}                         # 020 7946 0958
    )
    (?![\w-]|[.,/]\d)
    """,
    re.VERBOSE,
)


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """``text`` with emails, IP addresses (v4 and v6), card numbers and phone numbers replaced by
    ``[EMAIL]``, ``[IP]``, ``[CARD]`` and ``[PHONE]``, and how many of each kind were replaced.

    A card number is 13–19 digits, contiguous or in groups of 3–6 joined by one kind of separator
    (space or dash), that pass the Luhn check, whatever digit they start with. Cards are replaced
    before phone numbers, and no phone number is taken out of a card-shaped number (one that only
    fails Luhn). Years, prices, dates, clock times and version strings are left as they are.
    """
    counts: Counter[str] = Counter()

    def count(kind: str, placeholder: str) -> str:
        counts[kind] += 1
        return placeholder

    def ipv6(match: re.Match[str]) -> str:
        return count("ip", "[IP]") if _is_ipv6(match.group(0)) else match.group(0)

    def phone(match: re.Match[str]) -> str:
        digits = sum(char.isdigit() for char in match.group(0))
        low, high = (8, 15) if match.group(0).startswith("+") else (10, 12)
        return count("phone", "[PHONE]") if low <= digits <= high else match.group(0)

    text = _EMAIL.sub(lambda _: count("email", "[EMAIL]"), text)
    text = _IPV6_CANDIDATE.sub(ipv6, text)
    text = _IPV4.sub(lambda _: count("ip", "[IP]"), text)
    # Cards before phones, so a card is never half-eaten as a phone number; a card-shaped number that
    # fails Luhn (an order or account number) is then kept whole rather than cut into "7000 [PHONE]".
    text = _DIGIT_RUN.sub(lambda match: _replace_cards(match.group(0), counts), text)
    card_shaped = [match.span() for match in _DIGIT_RUN.finditer(text) if _is_card_shaped(match.group(0))]
    return _PHONE.sub(lambda match: _unless_inside(match, card_shaped, phone), text), counts


def _unless_inside(match: re.Match[str], spans: list[tuple[int, int]], replace: Callable[[re.Match[str]], str]) -> str:
    start, end = match.span()
    if any(low <= start and end <= high for low, high in spans):
        return match.group(0)
    return replace(match)


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    # "::", "1::2" and "a::b" are valid addresses but far more often slices or scope operators.
    return candidate.count(":") >= 3 or any(len(group) == 4 for group in candidate.split(":"))


def _replace_cards(run: str, counts: Counter[str]) -> str:
    parts = re.split(r"([ -])", run)
    groups, separators = parts[0::2], parts[1::2]
    pieces: list[str] = []
    start = 0
    while start < len(groups):
        end = _card_end(groups, separators, start)
        if end is None:
            pieces.append(groups[start])
            end = start + 1
        else:
            pieces.append("[CARD]")
            counts["card"] += 1
        if end < len(groups):
            pieces.append(separators[end - 1])
        start = end
    return "".join(pieces)


def _card_end(groups: list[str], separators: list[str], start: int) -> int | None:
    """End (exclusive) of the longest card number made of groups ``start``, ``start + 1``, …"""
    longest = None
    digits = ""
    for end in range(start + 1, len(groups) + 1):
        if end - start > 1 and not _card_grouping(groups[start:end], separators[start : end - 1]):
            break
        digits += groups[end - 1]
        if len(digits) > 19:
            break
        if len(digits) >= 13 and _luhn_valid(digits):
            longest = end
    return longest


def _card_grouping(groups: list[str], separators: list[str]) -> bool:
    """One group, or groups of 3–6 digits joined by one kind of separator: how cards are written."""
    return len(groups) == 1 or (len(set(separators)) == 1 and all(3 <= len(g) <= 6 for g in groups))


def _is_card_shaped(run: str) -> bool:
    """13–19 digits grouped as a card is, Luhn-valid or not."""
    parts = re.split(r"([ -])", run)
    groups = parts[0::2]
    return 13 <= sum(len(g) for g in groups) <= 19 and _card_grouping(groups, parts[1::2])


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


# -- preparation -----------------------------------------------------------------------------------
