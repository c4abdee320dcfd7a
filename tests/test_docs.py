"""The front door stays short and its links lead somewhere: README.md within 300 lines with the
two set-up commands CI runs in its first 60, and every relative link of the README and docs/
pointing at a file (and, with #anchor, a heading) that exists."""
import re

from helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_starts_with_the_commands_ci_runs():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    head = "\n".join(lines[:60])
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "pytest -q"):
        assert command in head
        assert command.replace("-e ", "-q -e ") in ci or command in ci


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue        # http(s), mailto
            path, _, frag = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif frag and file.suffix == ".md":
                headings = [anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)]
                if frag not in headings:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
