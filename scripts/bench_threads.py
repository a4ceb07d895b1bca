"""How many torch threads serve a CPU training run best, on an idle machine and on a busy one.

    python scripts/bench_threads.py --out scripts/bench_results/threads_2cpu_avx2.json

Each setting trains the embedded demo for --steps steps in a fresh process (OMP_NUM_THREADS=N, or torch's default:
one per core), once on an idle machine and once while --hogs processes spin on the CPU (as a second training, a
browser or a CI neighbour would). Reported per setting: wall time of the process and the Trainer's own training
time (summary.json's train_runtime_s). The baseline is torch's default in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spin(stop) -> None:
    while not stop.is_set():
        pass


def train(threads: int | None, steps: int, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "finetune", "recipe=tiny_qlora", f"output_dir={out}", f"train.max_steps={steps}",
           f"train.save_steps={10 * steps}", "eval.exact_match_samples=0", "export=adapter", "tracking=none"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 2), "train_runtime_s": round(summary["train_runtime_s"], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--hogs", type=int, default=os.cpu_count(), help="busy processes for the loaded case")
    ap.add_argument("--out", type=Path, default=Path("threads.json"))
    args = ap.parse_args()
    results = {"cpus": os.cpu_count(), "steps": args.steps, "hogs": args.hogs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("idle", "loaded"):
            stop = multiprocessing.Event()
            hogs = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(args.hogs if load == "loaded" else 0)]
            for h in hogs:
                h.start()
            try:
                for threads in [None, *args.threads]:
                    figures = train(threads, args.steps, Path(tmp) / f"{load}-{threads}")
                    results["runs"].append({"load": load, "threads": threads or "default", **figures})
                    print(json.dumps(results["runs"][-1]), flush=True)
            finally:
                stop.set()
                for h in hogs:
                    h.join()
    for run in results["runs"]:
        base = next(r for r in results["runs"] if r["load"] == run["load"] and r["threads"] == "default")
        run["train_runtime_vs_default"] = round(run["train_runtime_s"] / base["train_runtime_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
