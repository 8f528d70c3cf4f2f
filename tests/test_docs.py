"""README.md and docs/*.md. Every relative link names a file of the repository and, with a
#fragment, a heading of that file (GitHub's anchors), so moving text between them breaks no link.
Every table of figures is generated from results/*.json (docs/tables.py) and equals it, so a
figure lives in one place; no docstring, --help or Makefile comment quotes one."""
import json
import re
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import tables  # noqa: E402

DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
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


# --- the tables: generated from results/*.json ---------------------------------------------

@pytest.mark.parametrize("doc", DOCS)
def test_every_table_equals_its_json(doc):
    """Each <!-- table: NAME --> block is what docs/tables.py makes of the JSON; `make tables`
    rewrites them after a command has written new figures."""
    text = (ROOT / doc).read_text()
    assert text.count("<!-- table:") == text.count("<!-- /table -->"), f"{doc}: an unclosed table block"
    want = tables.render(text)
    if want != text:
        stale = [m.group(2) for m, w in zip(tables.BLOCK.finditer(text), tables.BLOCK.finditer(want))
                 if m.group(0) != w.group(0)]
        pytest.fail(f"{doc}: the tables {', '.join(stale)} differ from results/*.json; run `make tables`")


def test_the_readme_and_results_carry_the_tables():
    """The demo table and its printout in README, every experiment's table in docs/results.md."""
    found = {m.group(2) for doc in DOCS for m in tables.BLOCK.finditer((ROOT / doc).read_text())}
    assert found == set(tables.TABLES)


def test_a_changed_figure_makes_its_table_stale(tmp_path):
    """The check has teeth: change one figure in a copy of the JSON and the rendered README and
    docs/results.md differ from what is on disk."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    demos = json.loads((results / "demos.json").read_text())
    demos["demos"][0]["knn_top1"] += 0.01
    (results / "demos.json").write_text(json.dumps(demos))
    compare = json.loads((results / "compare.json").read_text())
    compare["rows"][0]["linear_top1"] += 0.01
    (results / "compare.json").write_text(json.dumps(compare))
    for doc in ["README.md", "docs/results.md"]:
        text = (ROOT / doc).read_text()
        assert tables.render(text, results) != text, doc


# --- no figure outside results/ and the generated tables ------------------------------------

FIGURE = re.compile(r"\d{2}\.\d{1,2} ?%%?|\d+ min \d+ s|\d+(\.\d+)? s per epoch|\bkNN[^\n]{0,40}\b\d{2}\.\d\b")
SOURCES = ["simclr.py", "moco.py", "byol.py", "simsiam.py", "mae.py", "supervised.py", "bench.py"] + \
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*.py"))


def docstrings_and_help(path):
    """The module's and functions' docstrings and the help= strings of a Python file."""
    import ast
    tree = ast.parse(path.read_text())
    texts = [ast.get_docstring(n) or "" for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))]
    texts += [ast.unparse(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
              for k in n.keywords if k.arg == "help"]
    return texts


@pytest.mark.parametrize("src", SOURCES)
def test_no_measured_figure_in_docstrings_or_help(src):
    """A docstring or --help says how to run and why a default is what it is, never what a run
    scored: that goes stale. The figures are in results/*.json and the README's tables."""
    hits = [m.group(0) for text in docstrings_and_help(ROOT / src) for m in FIGURE.finditer(text)]
    assert not hits, f"{src}: {hits}"


def test_no_measured_figure_in_makefile_comments():
    comments = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.lstrip().startswith("#")]
    hits = [m.group(0) for line in comments for m in FIGURE.finditer(line)]
    assert not hits, hits


def test_demos_py_records_a_run_in_place_of_the_methods_entries(tmp_path):
    """experiments/demos.py --run: a finished demo's summary.json and log become the method's
    only entry of results/demos.json, and the README's table renders from it."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import demos
    run = tmp_path / "run"
    run.mkdir()
    args = {"arch": "resnet18", "width": 16, "depth": 12, "patch_size": 4}
    (run / "summary.json").write_text(json.dumps({
        "epochs": 16, "batch_size": 128, "knn_top1_init": 0.17, "knn_top1_init_bn": 0.12, "knn_top1": 0.3,
        "epoch_seconds": 9.04, "images_per_s": 1100.2, "device": "cpu (2 cores, 2 threads)", "torch": "2.13.0",
        "date": "2026-12-07", "args": args}))
    (run / "log.jsonl").write_text("\n".join(json.dumps(h) for h in [
        {"epoch": 5, "knn_top1": 0.25}, {"epoch": 6}, {"epoch": 16, "knn_top1": 0.3}]) + "\n")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    before = json.loads((results / "demos.json").read_text())["demos"]
    demos.record(results / "demos.json", demos.entry("moco", "python moco.py --data shapes", run, 200.4))
    after = json.loads((results / "demos.json").read_text())["demos"]
    moco = [e for e in after if e["method"] == "moco"]
    assert len(moco) == 1 and moco[0]["knn_by_epoch"] == {"5": 0.25, "16": 0.3}
    assert moco[0]["encoder"] == "ResNet-18, width 16" and moco[0]["command_seconds"] == 200
    assert [e["method"] for e in after if e["method"] != "moco"] == [e["method"] for e in before if e["method"] != "moco"]
    assert after.index(moco[0]) == [e["method"] for e in before].index("moco")
    assert "| `moco` | ResNet-18, width 16 | 16 (batch 128) | 17.00 (12.00) | 30.00 |" in tables.demos(results)
