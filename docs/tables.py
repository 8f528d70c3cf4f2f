"""Every table of measured figures in README.md and docs/*.md, generated from results/*.json.

The JSON files are the one place a figure lives: each is written by the command that measured
it (`make compare`, `make laptop`, `experiments/demos.py`, ...), with its date and machine. In
the Markdown a generated table sits between two comments,

    <!-- table: compare -->
    ...                       (this script's output; edit the JSON, never this)
    <!-- /table -->

and NAME is one of TABLES below. `tests/test_docs.py` checks that every such block equals what
this script makes of the JSON, so a figure changed in one place and not the other fails a test.

    python docs/tables.py            # rewrite the blocks in README.md and docs/*.md (make tables)
    python docs/tables.py --check    # list the blocks that differ from the JSON; exit 1 if any

Only the standard library: it runs without torch.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/results.md", "docs/notes.md", "docs/recipes.md"]
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
ARCH = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "vit_tiny": "ViT-Tiny",
        "vit_small": "ViT-Small"}


# --- formatting ----------------------------------------------------------------------------

def pct(v, digits=1):
    return "–" if v is None else f"{100 * v:.{digits}f}"


def num(v, fmt):
    return "–" if v is None else format(v, fmt)


def hms(s):
    return "–" if s is None else f"{int(s) // 60} min {int(s) % 60} s"


def table(header, rows):
    """A GitHub-markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def load(results, name):
    return json.loads((results / f"{name}.json").read_text())


def source(name, config):
    """The line under an experiment's table: where it comes from, how it was run, when, where."""
    command = config.get("command")
    if command is None:                                        # a JSON from before "command" was written
        command = f"python experiments/{name}.py --epochs {config['epochs']} --data {Path(config['data']).name}"
        command += " -- " + " ".join(config["extra"]) if config.get("extra") else ""
    machine = config.get("machine", "").split(" (transcribed")[0] or config["device"]
    return f"\n`results/{name}.json`: `{command}`; {machine}, {config['device']}, {config['date']}.\n"


def machine(entry):
    """The short name of the machine an entry was measured on: "Intel Xeon", "NVIDIA H100 ..."."""
    return entry.get("machine") or entry["hardware"].split(",")[0]


# --- the tables ----------------------------------------------------------------------------

def demos(results):
    d = load(results, "demos")["demos"]
    rows = []
    for e in d:
        bn = e["knn_top1_init_bn"]
        gain = 100 * (e["knn_top1"] - e["knn_top1_init"])
        gain_bn = "" if bn is None else f" ({100 * (e['knn_top1'] - bn):+.1f})"
        rows.append((f"`{e['method']}`", e["encoder"], f"{e['epochs']} (batch {e['batch_size']})",
                     pct(e["knn_top1_init"], 2) + ("" if bn is None else f" ({pct(bn, 2)})"),
                     pct(e["knn_top1"], 2), f"{gain:+.1f}{gain_bn}", num(e["epoch_seconds"], ".1f"),
                     hms(e["command_seconds"]), f"{machine(e)}, {e['date']}"))
    out = table(["`make demo METHOD=`", "encoder", "epochs", "kNN % at random init (BN refreshed)", "kNN % after",
                 "gain (over refreshed)", "s per epoch", "whole command", "machine, date"], rows)
    for e in d:
        if e.get("linear_top1") is not None:
            out += (f"\n`{e['method']}` also fits a linear probe: {pct(e['linear_top1'], 2)}% "
                    f"(the same encoder untrained: {pct(e['linear_top1_init'], 2)}%).\n")
    return out + ("\nFrom `results/demos.json`, which holds each run's machine and exact command "
                  "(\"–\": not recorded).\n")


def demo_output(results):
    """What `make demo` prints, the figures from the first SimCLR entry of results/demos.json."""
    e = next(e for e in load(results, "demos")["demos"] if e["method"] == "simclr")
    bars = f"{pct(e['knn_top1_init'], 2)}%" + (
        "" if e["knn_top1_init_bn"] is None else f", {pct(e['knn_top1_init_bn'], 2)}% with BatchNorm statistics of the data")
    lines = ["$ make demo", f"kNN top-1 of the random-init encoder: {bars}", "…"]
    for epoch, knn in (e["knn_by_epoch"] or {str(e["epochs"]): e["knn_top1"]}).items():
        lines.append(f"epoch {epoch}/{e['epochs']} loss … std*sqrt(d) … kNN {pct(knn, 2)}% …s … img/s")
    lines.append(f"done: {e['epochs']} epochs in …; kNN top-1 {pct(e['knn_top1'], 2)}% (random init {bars}). "
                 f"Outputs in runs/simclr-…")
    return "```\n" + "\n".join(lines) + "\n```\n"


def laptop(results):
    d = load(results, "laptop")
    rows = [(r["method"], ARCH.get(r["arch"], r["arch"]), r["budget"], pct(r["knn_init"]), pct(r["knn_init_bn"]),
             pct(r["knn"]), num(None if r["knn"] is None else 100 * (r["knn"] - r["knn_init"]), "+.1f"),
             pct(r["linear"]), num(r["epoch_seconds"], ".0f"), num(r["images_per_s"], ",.0f")) for r in d["rows"]]
    c = d.get("config_of_kept_rows", d["config"])
    out = (table(["method", "backbone", "budget", "kNN % at init", "at init, BN refreshed", "kNN %", "gain",
                  "linear probe %", "epoch s", "images/s"], rows)
           + f"\n`results/laptop.json`: `make laptop` (CIFAR-10, batch {c['batch_size']}); "
             f"{c.get('machine', '').split(' (transcribed')[0] or c['device']}, {c['device']}, {c['date']}")
    later = [r for r in d["rows"] if r.get("measured")]        # rows re-measured since (laptop.py --only)
    for r in later:
        out += f"; {r['method']} ({ARCH.get(r['arch'], r['arch'])}) re-measured {r['measured']}"
        out += f", {r['timing_note']}" if r.get("timing_note") else ""
    return out + ".\n"


def temperature(results):
    d = load(results, "temperature")
    return (table(["tau"] + [f"{t:g}" for t in d["taus"]],
                  [["kNN top-1 %"] + [pct(v) for v in d["knn_top1"]],
                   ["final loss"] + [f"{v:.3f}" for v in d["final_loss"]]])
            + f"\nRandom init: {pct(d['knn_top1_init'])}% kNN.\n" + source("temperature", d["config"]))


def mask_ratio(results):
    d = load(results, "mask_ratio")
    rows = [(f"{r:g}", pct(lin), pct(ft), pct(knn))
            for r, lin, ft, knn in zip(d["ratios"], d["linear_top1"], d["finetune_top1"], d["knn_top1"])]
    rows.append(("from scratch", "–", pct(d["finetune_top1_scratch"]), "–"))
    header = ["mask ratio", "linear probe %", f"fine-tune % ({d['finetune_epochs']} ep)", "kNN %"]
    if "interpolation_mse" in d:                               # the fills without learning, from issue 34 on
        fills = [tuple(f"{v:.3f}" for v in f) for f in zip(*d["interpolation_mse"].values())] + [("–", "–")]
        rows = [(*row, *fill) for row, fill in zip(rows, fills)]
        header += ["nearest-pixel fill MSE", "flat fill MSE"]
    return table(header, rows) + source("mask_ratio", d["config"])


def collapse(results):
    d = load(results, "collapse")
    runs = [k for k in d if k != "config"]
    rows = [(k, f"{d[k]['emb_std_x_sqrt_d'][0]:.2f} -> {d[k]['emb_std_x_sqrt_d'][-1]:.2f}", pct(d[k]["knn_top1"][-1]))
            for k in runs]
    n = len(d[runs[0]]["knn_top1"])
    return (table(["run", f"std x sqrt(d), epoch 1 -> {n}", f"kNN top-1 % after {n} epochs"], rows)
            + source("collapse", d["config"]))


def labels(results):
    d = load(results, "labels")
    ft = d["finetune_epochs"]
    rows = []
    for m in d["linear_top1"]:
        rows.append((m, "linear probe", *map(pct, d["linear_top1"][m])))
        rows.append((m, f"fine-tune ({ft} ep)", *map(pct, d["finetune_top1"][m])))
    rows.append(("Supervised", f"trained on the labels ({d['config']['epochs']} ep)", *map(pct, d["supervised_top1"])))
    rows.append(("From scratch", f"fine-tune recipe ({ft} ep)", *map(pct, d["scratch_top1"])))
    return (table(["encoder", "evaluation"] + [f"{f:.0%} labels" for f in d["fractions"]], rows)
            + source("labels", d["config"]))


def augment(results):
    d = load(results, "augment")
    full = d["knn_top1"]["full pipeline"]
    rows = [(k, pct(v), f"{100 * (v - full):+.1f}") for k, v in d["knn_top1"].items()]
    rows.append(("random init, untrained", pct(d["knn_top1_init"]), f"{100 * (d['knn_top1_init'] - full):+.1f}"))
    return table(["augmentation", "kNN top-1 %", "vs full"], rows) + source("augment", d["config"])


def pretext(results, name="pretext"):
    """`make exp-pretext` on shapes (pretext.json) or on CIFAR-10 (pretext_cifar10.json: the same
    command with DATA= at the laptop budget, its results renamed)."""
    if not (results / f"{name}.json").exists():
        return "Not measured yet: `make exp-pretext`.\n"
    d = load(results, name)
    rows = [(r["method"], r["objective"], ARCH.get(r["arch"], r["arch"]), pct(r["knn_top1"]), pct(r["linear_top1"]),
             pct(r["task_top1"])) for r in d["rows"]]
    return (table(["encoder", "objective", "backbone", "kNN %", "linear probe %", "own task top-1 %"], rows)
            + source(name, d["config"]))


def attention(results):
    if not (results / "attention.json").exists():
        return "Not measured yet: `make exp-attention`.\n"
    d = load(results, "attention")
    names = {"dino": "DINO", "supervised": "supervised", "random": "untrained"}
    rows = [(names[k], f"{d['jaccard'][k]:.3f} (head {d['best_head'][k]})", f"{d['jaccard_mean_over_heads'][k]:.3f}",
             pct(d["knn_top1"][k])) for k in ("dino", "supervised", "random")]
    return (table(["ViT-Mini/4, 3 blocks, 32 px shapes", "Jaccard, best head", "mean over heads", "kNN %"], rows)
            + source("attention", d["config"]))


def compare(results):
    d = load(results, "compare")
    rows = [(r["method"], ARCH.get(r["arch"], r["arch"]), pct(r["knn_top1"]), pct(r["linear_top1"]),
             num(r["epoch_seconds"], ".1f"), num(r["images_per_s"], ",.0f"), num(r["peak_memory_mib"], ",.0f"))
            for r in d["rows"]]
    return (table(["method", "backbone", "kNN %", "linear probe %", "epoch s", "images/s", "peak memory MiB"], rows)
            + source("compare", d["config"]))


TABLES = {"demos": demos, "demo-output": demo_output, "laptop": laptop, "temperature": temperature,
          "mask-ratio": mask_ratio, "collapse": collapse, "labels": labels, "augment": augment, "compare": compare,
          "pretext": pretext, "pretext-cifar10": lambda results: pretext(results, "pretext_cifar10"),
          "attention": attention}


# --- rewriting the documents -----------------------------------------------------------------

def render(text, results=ROOT / "results"):
    """`text` with every table block regenerated from the JSON in `results`."""
    def fill(m):
        if m.group(2) not in TABLES:
            raise KeyError(f"<!-- table: {m.group(2)} -->: no such table; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[m.group(2)](results) + m.group(4)
    return BLOCK.sub(fill, text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.exists():
            continue
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                path.write_text(new)
    verb = "differ from results/*.json" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "every table equals results/*.json")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
