"""README.md and docs/notes.md: every relative link names a file of the repository and, with a
#fragment, a heading of that file (GitHub's anchors), so moving text between them breaks no link."""
import re

import pytest

from conftest import ROOT

DOCS = ["README.md", "docs/notes.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")                 # [text](target)


def anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores
    kept), each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)   # no headings inside code blocks
    return {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_anchor_follows_github():
    assert anchor("Every method on a laptop (`make laptop`)") == "every-method-on-a-laptop-make-laptop"
    assert anchor("MoCo's demo") == "mocos-demo"
    assert anchor("Short runs: the recipes' schedules scale with the run") == \
        "short-runs-the-recipes-schedules-scale-with-the-run"


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    src = ROOT / doc
    links = [t for t in LINK.findall(src.read_text()) if not re.match(r"[a-z]+:", t)]   # not http:, mailto:
    assert links, f"{doc} has no relative links: the pattern is wrong"
    broken = []
    for target in links:
        file, _, frag = target.partition("#")
        path = (src.parent / file).resolve() if file else src
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif frag and path.suffix == ".md" and frag not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{frag} in {path.name}")
    assert not broken, "\n".join(broken)
