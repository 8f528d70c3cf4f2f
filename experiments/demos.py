"""Measure one `make demo METHOD=...` again and write its figures into results/demos.json.

The README's table of demos is generated from results/demos.json (`make tables`), which holds
one entry per method and machine. This script runs the method's demo exactly as the Makefile
writes it (`DEMO_<method>`, read with `make -n`), into a run folder of its own, timing the
whole command; then it copies the run's summary.json (kNN at random init, both bars, kNN after,
epochs, seconds per epoch, images/s, date) and the kNN of log.jsonl at each evaluation into the
method's entry, with the machine it ran on and the exact command. The code has changed when a
demo is measured again, so every older entry of that method, on any machine, is dropped.

    python experiments/demos.py --method dino              # run the demo, then record it
    python experiments/demos.py --method dino --run runs/demo-dino-20261206-101500   # record a finished run
    make tables                                            # then rewrite the README's table

Run it alone on the machine: the seconds per epoch are part of the record.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["simclr", "moco", "byol", "simsiam", "dino", "mae", "rotation"]


def demo_command(method):
    """The Makefile's `make demo METHOD=method`, as the python command line it runs."""
    out = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "demo", f"METHOD={method}", "PY=python"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("python "))


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def encoder(args):
    if args["arch"].startswith("resnet"):
        return f"ResNet-{args['arch'][6:]}, width {args['width']}"
    return f"ViT, {args['depth']} blocks, {args['patch_size']} px patches"


def entry(method, command, run_dir, seconds):
    s = json.loads((run_dir / "summary.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    cpu = s["device"].startswith("cpu")
    return {
        "method": method, "command": f"make demo METHOD={method}", "script_command": command,
        "encoder": encoder(s["args"]), "epochs": s["epochs"], "batch_size": s["batch_size"],
        "knn_top1_init": s["knn_top1_init"], "knn_top1_init_bn": s.get("knn_top1_init_bn"),
        "knn_top1": s["knn_top1"],
        "knn_by_epoch": {str(h["epoch"]): h["knn_top1"] for h in log if "knn_top1" in h} or None,
        "linear_top1": s.get("linear_top1"), "linear_top1_init": None,
        "epoch_seconds": round(s["epoch_seconds"], 1), "images_per_s": round(s["images_per_s"]),
        "command_seconds": None if seconds is None else round(seconds),
        "machine": cpu_model() if cpu else s["device"],
        "hardware": f"{s['device']}" + (f" ({cpu_model()})" if cpu else "") + f", torch {s['torch']}",
        "date": s["date"],
    }


def record(path, new):
    """Replace every entry of new's method (keeping the first one's place) with new."""
    data = json.loads(path.read_text())
    old = [i for i, e in enumerate(data["demos"]) if e["method"] == new["method"]]
    at = old[0] if old else len(data["demos"])
    data["demos"] = [e for e in data["demos"] if e["method"] != new["method"]]
    data["demos"].insert(min(at, len(data["demos"])), new)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--run", type=Path, default=None,
                   help="a finished run folder of that demo to record instead of running it (no wall clock)")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    command = demo_command(args.method)
    seconds = None
    if args.run is None:
        args.run = ROOT / "runs" / f"demo-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        argv_ = [sys.executable] + shlex.split(command)[1:] + ["--out", str(args.run)]
        print(" ".join(argv_), file=sys.stderr)
        t0 = time.time()
        subprocess.run(argv_, cwd=ROOT, check=True, env=dict(os.environ))
        seconds = time.time() - t0
    new = entry(args.method, command, args.run, seconds)
    record(args.results / "demos.json", new)
    print(f"wrote {args.method}'s entry of {args.results / 'demos.json'}; `make tables` updates the README",
          file=sys.stderr)


if __name__ == "__main__":
    main()
