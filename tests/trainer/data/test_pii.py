"""PII scrubbing: emails, IPs, card numbers and phone numbers replaced and counted; ordinary numbers kept."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainer.data.pii import scrub_pii


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.roe+news@mail.example.org today.", "Write to [EMAIL] today.", "email"),
        ("Reply to <a.b@c.de> please.", "Reply to <[EMAIL]> please.", "email"),
        ("Call +44 20 7946 0958 now.", "Call [PHONE] now.", "phone"),
        ("Call +1 (415) 555-2671 now.", "Call [PHONE] now.", "phone"),
        ("Call (415) 555-2671 now.", "Call [PHONE] now.", "phone"),
        ("Call 415.555.2671 now.", "Call [PHONE] now.", "phone"),
        ("Dial 1-800-555-0199.", "Dial [PHONE].", "phone"),
        ("Ring 020 7946 0958 in London.", "Ring [PHONE] in London.", "phone"),
        ("Ring 01 23 45 67 89 in Paris.", "Ring [PHONE] in Paris.", "phone"),
        ("Card 4111 1111 1111 1111 expires.", "Card [CARD] expires.", "card"),
        ("Card 5500-0000-0000-0004 expires.", "Card [CARD] expires.", "card"),
        ("Amex 3782 822463 10005 on file.", "Amex [CARD] on file.", "card"),
        ("Old visa 4222222222222 on file.", "Old visa [CARD] on file.", "card"),
        ("Expiry 2027 4111 1111 1111 1111 here.", "Expiry 2027 [CARD] here.", "card"),
        # Any leading digit: card-like means 13–19 Luhn-valid digits, not a known network's prefix.
        ("Card 7000 0000 0000 0005 on file.", "Card [CARD] on file.", "card"),
        ("Card 9000-0000-0000-0001 on file.", "Card [CARD] on file.", "card"),
        ("Store card 8000000000000003 on file.", "Store card [CARD] on file.", "card"),
        ("From 10.0.0.254 to the gateway.", "From [IP] to the gateway.", "ip"),
        ("It came from 192.168.1.1.", "It came from [IP].", "ip"),
        ("Host 2001:db8::8a2e:370:7334 is up.", "Host [IP] is up.", "ip"),
        ("Link-local fe80::1ff:fe23:4567:890a, too.", "Link-local [IP], too.", "ip"),
        ("Mapped ::ffff:192.0.2.1 counts once.", "Mapped [IP] counts once.", "ip"),
    ],
)
def test_pii_is_replaced_by_placeholders(text: str, expected: str, kind: str) -> None:
    assert scrub_pii(text) == (expected, Counter({kind: 1}))


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 the price rose from $1,299.99 to 24.50 dollars.",
        "Install torch 2.13.0 and numpy 2.4.6, or v1.2.3.4 of the old tool.",
        "Windows 10.0.19041.1 shipped on 2024-01-05, not 05/01/2024 or 12.05.2024.",
        "The meeting is at 12:30:45 in room 10:20.",
        "Order 1234567890123 shipped; the ISBN is 978-0-13-110362-7 and 9780131103627.",
        "The log timestamp 1700000000000 is in milliseconds.",
        "Card 4111 1111 1111 1112 fails the Luhn check.",
        "The population passed 8 000 000 000 people between 1990-2000 and pages 100-200.",
        "Scores went +5 points, then +20.5% on three dates: 2024-01-05 2024-02-05 2024-03-05.",
        "Use a[1::2], x[::1], std::vector and f :: Int, but not MAC 00:1a:2b:3c:4d:5e.",
        "Call extension 4412 or see section 3.1.4 of the guide.",
        # Card-shaped but not Luhn-valid: kept whole, never cut into "7000 [PHONE]".
        "Reference 7000 0000 0000 0009 is not a card.",
        "Reference 7000-0000-0000-0008 is not a card either.",
    ],
)
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    assert scrub_pii(text) == (text, Counter())


def test_a_card_is_replaced_before_phones_and_never_half_eaten() -> None:
    scrubbed, counts = scrub_pii("Call 020 7946 0958 or pay with 7000 0000 0000 0005 or 0000 0000 0000 0000.")
    assert scrubbed == "Call [PHONE] or pay with [CARD] or [CARD]."
    assert counts == Counter({"phone": 1, "card": 2})


def test_every_kind_is_counted_in_one_text() -> None:
    text = "Mail ann@example.com or bob@example.net, call (415) 555-2671, pay 4111-1111-1111-1111 from 10.1.2.3."
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == "Mail [EMAIL] or [EMAIL], call [PHONE], pay [CARD] from [IP]."
    assert counts == Counter({"email": 2, "phone": 1, "card": 1, "ip": 1})


# Long runs of hex and colons, or of digit groups, must not make a regex backtrack for ages.
PATHOLOGICAL = ["1:" * 5000 + "z", "1 " * 20000 + "x", "a" * 20000 + "@" + "b." * 5000 + "1"]


def test_pathological_input_is_scrubbed_without_catastrophic_backtracking() -> None:
    # In a child process: a backtracking regression fails at the timeout instead of hanging the suite.
    # The budget is generous (a linear scan takes well under a second) so a slow machine never trips it.
    script = (
        "import json, sys\n"
        "from trainer.data.pii import scrub_pii\n"
        "print(json.dumps([scrub_pii(text)[0] for text in json.load(sys.stdin)]))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(PATHOLOGICAL),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[3],
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scrub_pii ran for over 60 s on a pathological input: a regex backtracks")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == PATHOLOGICAL
