"""Every setting an operator can set is documented where operators look: the README."""

from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    missing = [
        f"EMBEDSERVE_{name.upper()}" for name in Settings.model_fields if f"EMBEDSERVE_{name.upper()}" not in readme
    ]
    assert missing == [], f"document these settings in README.md: {missing}"
