"""Build the preference demo's pairs from the SFT demo's rows (finetune/assets/demo_data), and ship the SFT demo run
it starts from:

    python scripts/build_demo_pairs.py [--sft-run outputs/tiny_qlora/TIME]

The tuned demo model writes every number in words. The pairs teach a new preference: numbers above 900 in digits
("947" chosen over "nine hundred forty seven"), and the rest still in words (the words chosen over the digits), so
the shift is visible both ways. Every training number above 900 gives a pair, and as many others are drawn with
--seed; the eval pairs come from the held-out eval rows the same way. Rows are TRL's conversational preference
format: {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}.

--sft-run copies a finished SFT demo run (`python -m finetune`) into finetune/assets/demo_sft_run: its config.yaml,
with the bundled model and data named as ${asset:...} so that it loads from any install, and its adapter/. The
preference demo (recipes/dpo_tiny.yaml) starts from it (init_from).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "finetune" / "assets"
SOURCE, TARGET, SFT_RUN = ASSETS / "demo_data", ASSETS / "demo_pairs", ASSETS / "demo_sft_run"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json")
DIGITS_ABOVE = 900


def pair(row: dict) -> tuple[int, dict]:
    """(the number, the pair) of one SFT demo row."""
    question, words = row["messages"][0]["content"], row["messages"][1]["content"]
    n = int(re.search(r"\d+", question).group())
    digits, spelled = {"role": "assistant", "content": str(n)}, {"role": "assistant", "content": words}
    chosen, rejected = (digits, spelled) if n > DIGITS_ABOVE else (spelled, digits)
    return n, {"prompt": [{"role": "user", "content": question}], "chosen": [chosen], "rejected": [rejected]}


def pairs(name: str, below: int, rng: random.Random) -> list[dict]:
    """Every pair above DIGITS_ABOVE, and `below` others drawn at random (-1: as many as above), in file order."""
    rows = [pair(json.loads(line)) for line in (SOURCE / f"{name}.jsonl").read_text().splitlines()]
    above = [i for i, (n, _) in enumerate(rows) if n > DIGITS_ABOVE]
    others = [i for i, (n, _) in enumerate(rows) if n <= DIGITS_ABOVE]
    keep = set(above) | set(rng.sample(others, len(above) if below < 0 else below))
    return [p for i, (_, p) in enumerate(rows) if i in keep]


def ship_sft_run(run: Path) -> None:
    """The SFT demo run's config.yaml (its asset paths as ${asset:...}) and adapter/ into SFT_RUN."""
    assets = str((run / "config.yaml").read_text()).split("name_or_path: ", 1)[1].split("\n", 1)[0]
    root = assets.rsplit("/tiny_llama", 1)[0]  # where the run's install kept finetune/assets
    shutil.rmtree(SFT_RUN, ignore_errors=True)
    (SFT_RUN / "adapter").mkdir(parents=True)
    (SFT_RUN / "config.yaml").write_text(re.sub(re.escape(root) + r"/([\w./]+)", r"${asset:\1}",
                                                (run / "config.yaml").read_text()))
    for name in ADAPTER_FILES:
        shutil.copy(run / "adapter" / name, SFT_RUN / "adapter" / name)
    config = json.loads((SFT_RUN / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "finetune/assets/tiny_llama"  # (a path on the machine that trained it)
    (SFT_RUN / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{SFT_RUN}: the SFT demo run {run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-run", type=Path, help="a finished SFT demo run to ship as the DPO demo's start")
    args = parser.parse_args()
    if args.sft_run:
        ship_sft_run(args.sft_run)
    rng = random.Random(args.seed)
    TARGET.mkdir(parents=True, exist_ok=True)
    for name, below in (("train", -1), ("eval", 21)):
        rows = pairs(name, below, rng)
        (TARGET / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{name}: {len(rows)} pairs, {sum(r['chosen'][0]['content'].isdigit() for r in rows)} preferring digits")


if __name__ == "__main__":
    main()
