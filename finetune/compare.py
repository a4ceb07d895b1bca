"""`eval run=ORIGINAL compare=A,B,...` (or `eval recipe=NAME compare=...` for a bare base): the original model beside
the smaller ones made from it, on its eval rows.

Each of A, B, ... is a run directory (a healing run of `prune`, a `distill` student, any tuned run: its adapter on
its base) or a model folder (what `prune` wrote). All are loaded at one precision (eval.quant, default unquantized)
and measured as `eval` measures (finetune.eval.measure: loss, exact match or the task metric, weights' memory,
generation tokens/s); their greedy answers are compared with the original's (agreement). Beside them, the GPU-hours
each took to make, from `plan`'s speed on plan.gpu: a run's trained tokens (summary.json) at the planned training
tokens/s, a distilled student's teacher pass, a pruned model's scoring pass; its own step and, with what it was
made from (a healed run: the pruning, and the run pruned), in all. Written to RUN_DIR/compare/ (eval.json, eval.png).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.errors import UserError
from finetune.run import Run, write_whole

log = logging.getLogger("finetune")


@dataclass
class Candidate:
    """One model of the comparison: what it is, how it loads (a Run; a bare model folder is a base-only Run)."""
    path: Path
    kind: str   # original (a run) or base, then pruned, healed, distilled, tuned, model
    run: Run

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.path.name}"


def candidate(path: str, original: Run) -> Candidate:
    """A run directory or a model folder, measured on the original's rows with the original's settings."""
    folder = Path(path).expanduser()
    if (folder / "config.yaml").is_file():
        run = Run.open(str(folder))
        kind = ("healed" if pruned_from(Path(run.cfg.model.name_or_path), original) else
                "distilled" if run.cfg.distill.teacher else "tuned")
        if not run.cfg.lora.enabled:  # a full fine-tune: its model/ is loaded, the run made it
            return Candidate(folder, kind, candidate(str(run.model_dir), original).run)
    elif (folder / "config.json").is_file():
        cfg = dataclasses.replace(original.cfg, output_dir=str(folder), model=dataclasses.replace(
            original.cfg.model, name_or_path=str(folder), tokenizer=str(folder), revision=None, hub_id=None))
        run, kind = Run.for_base(cfg), "pruned" if (folder / "prune.json").is_file() else "model"
    else:
        raise UserError(f"compare: {path} is neither a run directory (config.yaml) nor a model folder (config.json). "
                        "Give runs of train, distill or prune.heal, or folders prune wrote, separated by commas.")
    run.cfg = dataclasses.replace(run.cfg, data=original.cfg.data, eval=original.cfg.eval)  # the same rows, alike
    return Candidate(folder, kind, run)


def pruned_from(folder: Path, original: Run) -> bool:
    """Whether the model folder is what `prune` made of the original (a run, or a bare base): a run on it heals it."""
    path = folder.expanduser() / "prune.json"
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    if original.is_base:
        return report.get("source_run") is None and report.get("source_model") == original.cfg.model.name_or_path
    return report.get("source_run") == str(original.dir.resolve())


def precision(original: Run) -> str:
    """The one precision every model is loaded at: eval.quant's, or unquantized."""
    if original.cfg.eval.harness_tasks:
        raise UserError("eval.harness_tasks with compare=: lm-eval runs on one model at a time here. Run it with eval "
                        "run=RUN eval.harness_tasks=[...] for a run, or eval recipe=NAME model.name_or_path=FOLDER "
                        "eval.harness_tasks=[...] for a pruned model.")
    quant = list(original.cfg.eval.quant)
    if len(quant) > 1 or any(q.startswith("gguf:") for q in quant):
        raise UserError(f"eval.quant={quant} with compare=: every model is measured at one precision (nf4, int8 or "
                        "none; the default is none). Compare precisions of one run with eval run=RUN eval.quant=[...].")
    return quant[0] if quant else "none"


def production(path: Path, gpu: str, own: bool = True) -> list[dict]:
    """What it took to make the model at `path`, first step first: [{"step", "gpu_hours", "own"}] (gpu_hours None
    where `plan` cannot say; a base model nobody here trained is not counted). own: a step of `path` itself, not of
    what it was made from."""
    from finetune.config import ModelConfig
    from finetune.plan import forward_speed, load_arch, make_plan, pick_gpu, teacher_pass

    if (path / "config.yaml").is_file():
        run = Run.open(str(path))
        base = Path(run.cfg.model.name_or_path).expanduser()
        steps = production(base, gpu, False) if (base / "prune.json").is_file() else []
        tokens = run.summary.get("train_tokens")
        if run.cfg.distill.teacher:
            taught = (run.summary.get("distill") or {}).get("teacher_tokens")
            steps.append({"step": f"{path.name}: the teacher's pass over {taught} tokens",
                          "gpu_hours": teacher_pass(run.cfg, pick_gpu(gpu), taught)["hours"] if taught else None,
                          "own": own})
        speed = make_plan(run.cfg, gpu, "train")["tokens_per_second"]
        steps.append({"step": f"{path.name}: training, {tokens} tokens",
                      "gpu_hours": tokens / speed / 3600 if tokens else None, "own": own})
        return steps
    if not (path / "prune.json").is_file():  # a model nobody here made
        return []
    report = json.loads((path / "prune.json").read_text())
    if "scored_tokens" not in report:  # written before prune recorded it
        return [{"step": f"{path.name}: block influence", "gpu_hours": None, "own": own}]
    source = report.get("source_run")
    steps = production(Path(source), gpu, False) if source and (Path(source) / "config.yaml").is_file() else []
    arch = load_arch(ModelConfig(name_or_path=report["source_model"]))
    speed = forward_speed(arch, pick_gpu(gpu), "none", 1)
    steps.append({"step": f"{path.name}: block influence over {report['scored_tokens']} tokens",
                  "gpu_hours": report["scored_tokens"] / speed / 3600, "own": own})
    return steps


def cost(c: Candidate, gpu: Optional[str]) -> dict:
    """GPU-hours of the candidate's own step(s) and in all, and the steps (nothing without a GPU to plan for)."""
    if gpu is None:
        return {}
    try:
        steps = production(c.path, gpu)
    except UserError as e:  # plan cannot read an architecture: the figure is missing, the comparison stands
        log.info("compare: no GPU-hours for %s (%s)", c.path, e)
        return {}
    if not steps:  # a base model nobody here made
        return {}
    own = [s for s in steps if s["own"]]
    hours = [s["gpu_hours"] for s in steps]
    return {"gpu_hours": sum(s["gpu_hours"] for s in own) if all(s["gpu_hours"] is not None for s in own) else None,
            "gpu_hours_total": sum(hours) if None not in hours else None, "made_by": steps}


def compare(original: Run, paths: str, checkpoint: Optional[str] = None) -> tuple[Path, dict]:
    """Every model of `paths` (separated by commas) measured beside the original (a run, or a bare base) on its eval
    rows; eval.json and eval.png in RUN_DIR/compare/ (output_dir/compare/ for a base)."""
    from finetune.eval import Variant, eval_splits, measure, plot, rows_of, unquantized_dtype
    from finetune.plan import pick_gpu, planned_gpu

    if checkpoint or not (original.is_base or original.cfg.lora.enabled):
        raise UserError("eval compare= measures a run's final adapter beside the models made from it: "
                        + ("leave out checkpoint=." if checkpoint else "this run trained every weight; give its model/ "
                           "in compare= and another tuned run as run=."))
    first = (Candidate(Path(original.cfg.model.name_or_path), "base", original) if original.is_base else
             Candidate(original.dir, "original", original))
    models = [first] + [candidate(p, original) for p in paths.split(",") if p]
    quant, dtype = precision(original), unquantized_dtype(original.cfg)
    gpu = planned_gpu(original.cfg.plan.gpu, "compare's GPU-hours")
    splits = eval_splits(original.cfg)
    rows, pairs = rows_of(splits)
    rows_out = []
    for c in models:
        log.info("compare: %s on %d rows", c.label, len(splits.eval))
        row = measure(c.run, Variant(quant, dtype=dtype), rows, splits.chat, None, pairs=pairs)
        rows_out.append(row | {"label": c.label, "kind": c.kind, "path": str(c.path),
                               "adapter": c.kind not in ("base", "pruned", "model"), **cost(c, gpu)})
    reference = rows_out[0]
    for r in rows_out:
        r["agreement_original"] = (sum(a == b for a, b in zip(r["answers"], reference["answers"])) / len(splits.eval)
                                   if "answers" in r else None)
    result = {"model": str(original.dir), "reference": reference["label"], "quant": quant,
              "gpu": pick_gpu(gpu).name if gpu else None, "eval_rows": len(splits.eval),
              "eval_source": splits.eval_source, "task": original.cfg.eval.task, "rows": rows_out}
    out_dir = original.dir / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_whole(out_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, out_dir / "eval.png")
    return out_dir, result
