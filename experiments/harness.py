"""What the experiments share: train a method file into a run folder (or find it already
trained), evaluate an encoder with a budget of labels, write results/<name>.json and tables.

A run's folder is runs/experiments/<script>-<hash>, the hash taken over the run's resolved
configuration (every flag's value after parsing, except where the output goes and on which
device). Two experiments that need the same run share it: SimCLR at tau 0.2 is the temperature
sweep's middle point, the augmentation ablation's full pipeline and the comparison's SimCLR
row, and it is trained once. A finished run is read back; an interrupted one is continued
from its checkpoint.
"""
import argparse
import functools
import hashlib
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import supervised  # noqa: E402

# The six methods under one recipe (make compare, make exp-labels): the same data, epochs,
# batch size and evaluation. DINO runs on the ResNet-18 like the four before it; MAE needs a
# ViT (a ResNet cannot skip the masked patches), so its row is ViT-Tiny.
METHODS = [  # (label, script, flags)
    ("SimCLR", "simclr.py", []),
    ("MoCo v2", "moco.py", []),
    ("BYOL", "byol.py", []),
    ("SimSiam", "simsiam.py", []),
    ("DINO", "dino.py", ["--arch", "resnet18"]),
    ("MAE", "mae.py", ["--finetune-epochs", "0"]),
]
# Flags that do not change what is trained (common.WHERE_FLAGS) are left out of a run's identity.


# --- command line ---------------------------------------------------------------------------

def make_parser(description):
    p = argparse.ArgumentParser(description=description,
                                epilog="Everything after `--` is passed to every run; a flag that a script "
                                       "does not take is left out of that script's command, with a note.")
    p.add_argument("--epochs", type=common.positive_int, default=10, help="pretraining epochs of every run")
    p.add_argument("--data", default="shapes", help="as the method files' --data (shapes, cifar10, a path)")
    p.add_argument("--batch-size", type=common.positive_int, default=256,
                   help="the batch size of every run (learning rates scale with it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--results", default=str(ROOT / "results"), help="where the PNG, JSON and tables go")
    p.add_argument("--runs", default=str(ROOT / "runs" / "experiments"), help="where the run folders go")
    return p


def parse(parser, argv=None):
    """Parse the experiment's own flags; those after `--` become args.extra."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    try:
        Path(args.results).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise common.UserError(f"--results {args.results}: cannot create the folder ({e}).") from None
    return args


@functools.cache
def script_parser(script):
    """The method file's own argparse parser (its make_parser), imported from the file."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_parser()


def flags_for(script, flags):
    """`flags` without the options `script` does not take (and their values)."""
    takes = {opt: a.nargs != 0 for a in script_parser(script)._actions for opt in a.option_strings}
    kept, i = [], 0
    while i < len(flags):
        opt = flags[i].split("=")[0]
        has_value = "=" not in flags[i] and takes.get(
            opt, i + 1 < len(flags) and not flags[i + 1].startswith("--"))
        n = 1 + int(has_value)
        if opt in takes:
            kept += flags[i:i + n]
        else:
            print(f"note: {script} has no {opt}; left out of its command", file=sys.stderr)
        i += n
    return kept


def run_folder(script, flags, runs):
    """runs/<script>-<hash of the resolved configuration>."""
    config = {k: v for k, v in vars(script_parser(script).parse_args(flags)).items() if k not in common.WHERE_FLAGS}
    key = hashlib.sha1(json.dumps([script, sorted(config.items())], default=str).encode()).hexdigest()[:10]
    return Path(runs) / f"{Path(script).stem}-{key}"


# --- training -------------------------------------------------------------------------------

def run_flags(script, flags, args):
    """The experiment's data, epochs and batch size, then `flags`, then the extra flags (the
    last of a repeated flag wins), without those `script` does not take."""
    return flags_for(script, ["--data", args.data, "--epochs", str(args.epochs), "--batch-size",
                              str(args.batch_size), "--eval-every", str(max(1, args.epochs // 10)),
                              "--no-linear-probe", "--device", args.device, *flags, *args.extra])


def train(script, flags, args, label):
    """Train `script` with run_flags(...) unless an earlier call did. Returns the run folder."""
    flags = run_flags(script, flags, args)
    out = run_folder(script, flags, args.runs)
    if (out / "summary.json").exists():                        # an earlier call finished it
        return out
    if (out / "checkpoint.pt").exists():                       # an earlier call was interrupted
        cmd = [str(ROOT / script), "--resume", str(out / "checkpoint.pt"), "--epochs", str(args.epochs),
               "--device", args.device]
    else:
        cmd = [str(ROOT / script), *flags, "--out", str(out)]
    print(f"== {label}: {' '.join([script, *cmd[1:]])}", file=sys.stderr, flush=True)
    if subprocess.run([sys.executable, *cmd]).returncode != 0:
        raise common.UserError(f"the run '{label}' failed (its folder is {out}); see the message above. "
                               f"Running the same command again continues from its last checkpoint.")
    return out


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]


def read_summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


# --- evaluation with a budget of labels -----------------------------------------------------

def build_encoder(summary):
    """A randomly initialised encoder of the architecture a run's summary.json describes."""
    a = summary["args"]
    return common.build_backbone(a["arch"], summary["image_size"], a["width"], a["patch_size"], a.get("depth", 12))


def load_encoder(run_dir, device="cpu"):
    """The encoder a finished run exported (encoder.pt), rebuilt from its summary.json."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        backbone = build_encoder(summary)
        backbone.load_state_dict(torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=True))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise common.UserError(f"{run_dir}: not a finished run folder with summary.json and encoder.pt "
                        f"({type(e).__name__}: {e}).") from None
    return backbone.to(device), summary



@functools.cache
def _data(spec, data_dir, image_size, subset, seed, device):
    data = common.load_data(spec, data_dir, image_size, subset, seed)
    return data.to(device), data.mean_std()


def finetune_epochs(ft_epochs, n_labeled, n_train):
    """Epochs over the labelled images that see as many images as `ft_epochs` epochs over all
    of them: 1% of the labels gets 100 times the epochs, the same compute."""
    return max(1, round(ft_epochs * n_train / n_labeled))


def evaluate(run_dir, fraction, ft_epochs, device="auto", scratch=False, refresh_bn=False):
    """Top-1 on the test split with a class-balanced `fraction` of the training labels: a
    linear probe on the frozen encoder, and (ft_epochs > 0) fine-tuning it with
    common.fine_tune for the compute of ft_epochs epochs over all images. scratch=True: the
    same for a randomly initialised encoder of the run's architecture; refresh_bn=True: with
    its BatchNorm statistics refreshed on the training images first (common.refresh_batchnorm,
    the second random-init bar). Results are kept in the run folder's evaluations.json, so a
    second call costs nothing."""
    run_dir = Path(run_dir)
    cache_path = run_dir / "evaluations.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = (f"{'scratch' if scratch else 'pretrained'}{' bn-refreshed' if refresh_bn else ''} "
           f"fraction={fraction:g} ft_epochs={ft_epochs}")
    if key in cache:
        return cache[key]
    dev = common.pick_device(device)
    backbone, summary = load_encoder(run_dir, dev)
    a = summary["args"]
    if scratch:
        torch.manual_seed(a["seed"])
        backbone = build_encoder(summary).to(dev)
    data, mean_std = _data(a["data"], a["data_dir"], a["image_size"], a["subset"], a["seed"], str(dev))
    if not data.labeled:
        raise common.UserError(f"--data {a['data']} has no labels on a train and a test split; the "
                               f"experiments need them.")
    if refresh_bn:
        backbone = common.refresh_batchnorm(backbone, data.train_x, mean_std) or backbone   # a ViT: unchanged
    idx = supervised.label_subset(data.train_y, fraction, seed=a["seed"]).to(dev)
    labeled = common.Dataset(data.train_x[idx], data.train_y[idx], data.test_x, data.test_y, data.classes, data.name)
    what = (f"{run_dir.name} {'scratch' if scratch else 'encoder'}{', BN refreshed' if refresh_bn else ''}, "
            f"{100 * fraction:g}% labels ({len(idx)} images)")
    print(f"== evaluate {what}", file=sys.stderr, flush=True)
    result = {"labeled_images": len(idx), "linear_top1": common.linear_probe(backbone, labeled, mean_std)}
    if ft_epochs:
        epochs = finetune_epochs(ft_epochs, len(idx), len(data.train_x))
        torch.manual_seed(a["seed"])
        result["finetune_top1"] = common.fine_tune(backbone, labeled, mean_std, epochs,
                                                   name=f"fine-tune {what}")
    cache[key] = result
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=2) + "\n")
    tmp.replace(cache_path)
    return result


# --- results --------------------------------------------------------------------------------

def bar_plot(bars, path, title, xlabel, width=560):
    """Horizontal bars from 0, one per (label, value) in `bars`, top to bottom, each with its
    value written at its end (a negative value to the left of 0); None is drawn as "not run"."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 16 + max(probe.textlength(label, font=font) for label, _ in bars)
    row, T = 22, 30
    H = T + row * len(bars) + 46
    img = Image.new("RGB", (width, H), "white")
    draw = ImageDraw.Draw(img)
    L, R, B = left, width - 50, T + row * len(bars)
    values = [v for _, v in bars if v is not None and math.isfinite(v)]
    xt = common.nice_ticks(min([0.0, *values]), max([0.0, *values]))
    sx = lambda v: L + (v - xt[0]) / (xt[-1] - xt[0]) * (R - L)
    draw.text(((L + R) // 2, 8), title, fill="black", font=font, anchor="mt")
    for v in xt:
        draw.line((sx(v), T, sx(v), B), fill=(230, 230, 230))
        draw.line((sx(v), B, sx(v), B + 4), fill="black")
        draw.text((sx(v), B + 6), f"{v:g}", fill="black", font=font, anchor="mt")
    for i, (label, v) in enumerate(bars):
        y = T + row * i
        draw.text((L - 6, y + row // 2), label, fill="black", font=font, anchor="rm")
        if v is None or not math.isfinite(v):
            draw.text((L + 4, y + row // 2), "not run", fill="gray", font=font, anchor="lm")
            continue
        draw.rectangle((min(sx(0), sx(v)), y + 4, max(sx(0), sx(v)), y + row - 4), fill=common.PALETTE[0])
        draw.text((max(sx(0), sx(v)) + 4, y + row // 2), f"{v:.1f}", fill="black", font=font, anchor="lm")
    draw.line((sx(0), T, sx(0), B), fill="black")
    draw.line((L, B, R, B), fill="black")
    draw.text(((L + R) // 2, H - 12), xlabel, fill="black", font=font, anchor="mm")
    img.save(path)



def pct(v):
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def markdown_table(header, rows):
    """A GitHub-markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(args, name, payload, table=None):
    """results/<name>.json (with the configuration, the command, the machine and the date), and
    <name>.md if a table. README's and docs/'s tables are generated from the JSON (make tables)."""
    results = Path(args.results)
    payload = dict(payload, config={"data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
                                    "extra": args.extra, "device": device_label(args.device),
                                    "date": time.strftime("%Y-%m-%d"), "machine": machine_label(args.device),
                                    "command": " ".join(["python", f"experiments/{Path(sys.argv[0]).name}"] + sys.argv[1:])})
    (results / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if table is not None:
        (results / f"{name}.md").write_text(table)
        print(table)
    print(f"wrote {results / name}.json" + (" and .md" if table else "") + " and .png", file=sys.stderr)


def device_label(device):
    return common.device_name(common.pick_device(device))


def machine_label(device):
    """The processor's or GPU's name and torch's version: what a reader needs to compare times."""
    d = common.pick_device(device)
    name = common.device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if d.type != "cuda" and cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name}, torch {torch.__version__}"
