"""Data pipeline speed on a synthetic dataset: reading and checking rows, tokenization, and the cache.

    python scripts/bench_data.py --rows 100000 --out data_bench.json

Writes ROWS synthetic conversations, then times in one run, with the embedded demo tokenizer:
  read + check + convert (every run pays this), tokenization with an empty cache (the first run),
  and the same again with the cache filled (a second run on the same data: nothing is re-tokenized);
  and, as the baseline of the masks' cost, rendering and tokenizing the same rows with no mask at all
  (tokenizer.apply_chat_template, one process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=None, help="tokenization processes (data.num_proc)")
    ap.add_argument("--out", type=Path, default=Path("data_bench.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="finetune_bench_"))
    os.environ["FINETUNE_CACHE"] = str(work / "cache")
    from transformers import AutoTokenizer

    from finetune.config import DataConfig
    from finetune.data import load_splits
    from finetune.data.tokenize import tokenize

    rng = random.Random(0)
    words = "the red fox sees a big owl near the old barn and runs to the river".split()
    path = work / "chats.jsonl"
    with open(path, "w") as f:
        for i in range(args.rows):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "finetune" / "assets" / "tiny_llama")
    cfg = DataConfig(path=str(path), eval_fraction=0, max_length=256, num_proc=args.num_proc)

    figures = {"rows": args.rows, "num_proc": args.num_proc, "file_mb": path.stat().st_size / 1e6}
    t = time.perf_counter()
    splits = load_splits(cfg, seed=0)
    figures["read_check_convert_s"] = time.perf_counter() - t
    for run in ("first_run", "cached_run"):
        t = time.perf_counter()
        tok = tokenize(splits.train, tokenizer, cfg, "train", splits.conversational)
        figures[f"tokenize_{run}_s"] = time.perf_counter() - t
        figures[f"tokenize_{run}_from_cache"] = tok.cached
    figures["tokens"] = sum(tok.dataset["length"])
    figures["cache_speedup"] = figures["tokenize_first_run_s"] / figures["tokenize_cached_run_s"]
    t = time.perf_counter()
    for messages in splits.train["messages"]:
        tokenizer.apply_chat_template(messages, tokenize=True)
    figures["render_tokenize_no_mask_s"] = time.perf_counter() - t
    figures["mask_cost_ratio"] = figures["tokenize_first_run_s"] / figures["render_tokenize_no_mask_s"]
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print("\n".join(f"{k:>30}: {v:.3f}" if isinstance(v, float) else f"{k:>30}: {v}" for k, v in figures.items()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
