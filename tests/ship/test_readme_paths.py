"""Every path the README names exists: the Layout tree, and each `path/to/file` quoted in the text."""

import re

from tests.ship.conftest import ROOT

README = (ROOT / "README.md").read_text()
# Folders of the repository whose paths the README quotes (built or user folders, such as
# model_repository/ or runs/, are not in it).
TRACKED_TOPS = ("service/", "trainer/", "client/", "tests/", "loadtests/", "helm/", "examples/", "scripts/")
FILE_NAME = re.compile(r"(?<![\w/.<>-])[\w-]+\.(?:py|yaml|json|md|txt)\b")


def _layout_block() -> list[str]:
    section = README.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```\n", 2)[1].splitlines()


def layout_paths() -> list[str]:
    """The paths the Layout tree names: top folders at column 0, their entries at column 2 (a folder, or
    files before the description), and file names in an entry's description, inside that entry's folder."""
    paths: list[str] = []
    top = entry_dir = ""
    for line in _layout_block():
        indent = len(line) - len(line.lstrip(" "))
        names, _, description = line.strip().partition("  ")
        if indent == 0:
            top = entry_dir = names.split()[0]
            paths.append(top)
        elif indent == 2:
            entries = names.split()
            entry_dir = top + entries[0] if entries[0].endswith("/") else top
            paths += [top + entry for entry in entries]
        else:
            description = line
        if top.endswith("/") and not top.startswith("model_repository"):
            paths += [entry_dir + name for name in FILE_NAME.findall(description)]
    return paths


def quoted_paths() -> list[str]:
    """Every `...` in the README that is a path inside one of the repository's own folders."""
    quoted = re.findall(r"`([^`\s]+)`", README)
    return [q.rstrip(":,") for q in quoted if q.startswith(TRACKED_TOPS) and "<" not in q and "*" not in q]


def test_the_layout_tree_names_only_paths_that_exist() -> None:
    paths = layout_paths()
    assert len(paths) > 60, "the Layout tree was not parsed"
    missing = [p for p in paths if not (ROOT / p).exists() and not p.startswith("model_repository")]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_file_of_the_gateway_trainer_and_client_is_in_the_layout_tree() -> None:
    named = set(layout_paths())
    sources = [
        p.relative_to(ROOT).as_posix()
        for top in ("service", "trainer", "client")
        for p in (ROOT / top).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    ]
    unnamed = sorted(s for s in sources if s not in named)
    assert not unnamed, f"README Layout does not say what these are: {unnamed}"


def test_every_quoted_path_exists() -> None:
    paths = quoted_paths()
    assert paths, "no quoted paths found"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README quotes paths that do not exist: {missing}"
