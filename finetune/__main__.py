"""`python -m finetune [VERB] [recipe=NAME] [group=option ...] [key=value ...] [--cfg job] [--help]`"""

from __future__ import annotations

import logging
import os
import shlex
import sys

VERBS = {
    "train": "load base -> attach LoRA -> SFT with TRL -> evaluate -> export (the default)",
    "data": "load, check and tokenize the recipe's data; print counts, lengths and one marked example",
    "plan": "predict peak GPU memory, tokens/s and GPU-hours on a named GPU (plan.gpu=), without loading weights; "
            "with teacher=, distillation's teacher pass and its store too",
    "export": "write a run's adapter/ and merged/ again (or a checkpoint's), with the merge fidelity check",
    "generate": "answer prompts with a run's adapter or merged model; compare=true shows base and tuned",
    "publish": "push a run's adapter or merged model to the Hugging Face Hub with a model card",
    "eval": "loss, perplexity and task metrics of a run's adapter (run=) or a base (recipe=), at each eval.quant precision; "
            "compare=A,B,... puts the models made from the run (pruned, healed, distilled) beside it, with their GPU-hours",
    "prune": "drop the decoder layers that change the hidden state least (prune.layers=N or prune.target_params=P) from "
             "a run's model (run=) or a base (recipe=); prune.heal=sft|distill then trains LoRA on it (distill: taught by the "
             "unpruned model)",
    "distill": "train the recipe's model (the student) on a teacher's next-token distributions: teacher=RUN_DIR|MODEL "
               "[distill.top_k=32 distill.alpha=0.5 distill.loss=forward|reverse|jsd distill.temperature=1]",
}
RUN_VERBS = ("export", "generate", "publish", "eval", "prune")  # on an existing run directory: run=RUN_DIR


def key_line(key: str, f, suffix: str = "") -> str:
    """One line of --help: the key, its help text and its allowed values."""
    choices = f" [{'|'.join(map(str, f.metadata['choices']))}]" if f.metadata.get("choices") else ""
    return f"  {key:<28} {f.metadata.get('help', '')}{choices}{suffix}"


def verb_usage(verb: str) -> str:
    import dataclasses

    from finetune.config import schema_keys
    from finetune.verb_args import VERB_ARGS, overridable

    cls = VERB_ARGS[verb][0]
    lines = [f"usage: python -m finetune {verb} run=RUN_DIR [key=value ...]", "", f"{VERBS[verb]}.", "", "keys:"]
    if verb == "eval":
        lines[1:1] = ["       python -m finetune eval recipe=NAME [group=option ...] [key=value ...]   (a bare base model)"]
    lines += [key_line(f.name, f) for f in dataclasses.fields(cls)]
    lines += [key_line(key, schema_keys()[key], "  (default: the run's)") for key in overridable(verb)]
    return "\n".join(lines)


def run_verb(verb: str, argv: list[str]) -> int:
    """export / generate / eval / publish on an existing run directory."""
    from finetune.run import Run
    from finetune.verb_args import parse_verb_args

    args, overrides = parse_verb_args(verb, argv)
    run = Run.open(args.run, overrides)
    if verb == "generate":  # it only reads: it may sample a run that is still training
        from finetune.generate import generate

        generate(run, args)
        return 0
    with run.locked():  # the others write into the run, or upload it: not while another process writes it
        if verb == "eval" and args.compare:
            from finetune.compare import compare

            print_compare(*compare(run, args.compare, args.checkpoint))
        elif verb == "eval":
            from finetune.eval import eval_run

            print_eval(*eval_run(run, args.checkpoint))
        elif verb == "prune":
            prune_verb(run.cfg, None, run)
        elif verb == "export":
            from finetune.export import export

            print_export(*export(run, args.checkpoint))
        else:
            from finetune.publish import publish

            print(f"published: {publish(run)}")
    return 0


def print_eval(out_dir, result: dict) -> None:
    from finetune.eval import table

    print(table(result))
    print(f"eval.json and eval.png in {out_dir}")


def print_compare(out_dir, result: dict) -> None:
    from finetune.eval import table

    print(table(result))
    print(f"GPU-hours on the {result['gpu']} at plan's speed, and what made each model:" if result["gpu"] else
          "GPU-hours: name a GPU to plan them on with plan.gpu=NAME")
    for r in result["rows"] if result["gpu"] else []:
        print(f"  {r['label']}" + ("" if r.get("made_by") else ": not made here"))
        for s in r.get("made_by", []):
            print(f"    {s['step']}: " + (f"{s['gpu_hours']:.3g} GPU-hours" if s["gpu_hours"] is not None else "unknown"))
    print(f"eval.json and eval.png in {out_dir}")


def print_export(out_dir, summary: dict) -> None:
    if summary.get("merge_base"):
        print(f"merged into the {summary['merge_base']} base: mean KL {summary['merge_mean_kl']:.3g} nats/token "
              f"to the model as trained; loss {summary['merge_eval_loss']:.4g} (as trained: "
              f"{summary['merge_reference_eval_loss']:.4g})")
    print(f"exported to {out_dir}")


def usage() -> str:
    from finetune.config import GROUPS, schema_keys
    from finetune.registry import group_options, recipes

    lines = [
        "usage: python -m finetune [VERB] [recipe=NAME] [group=option ...] [key=value ...] [--cfg job [--resolve]]",
        f"       python -m finetune {{{'|'.join(RUN_VERBS)}}} run=RUN_DIR [key=value ...]   (their keys: VERB --help)",
        "",
        "verbs:",
        *[f"  {v:<8} {d}" for v, d in VERBS.items()],
        "",
        f"recipes (recipe=NAME): {', '.join(recipes())}   (default: tiny_qlora, the embedded demo)",
        "",
        "groups (group=option):",
        *[f"  {g:<9} {', '.join(group_options(g))}" for g in GROUPS],
        "",
        "keys (key=value):",
    ]
    lines += [key_line(key, f) for key, f in schema_keys().items()]
    return "\n".join(lines)


def quiet_library_notices() -> None:
    """Notices a user cannot act on are dropped; every other warning stays:
    - bitsandbytes, on every CPU import with AVX512-BF16: it could not fetch an optional faster CPU kernel;
    - bitsandbytes: paged optimizers fall back to unpaged on a CPU (summary.json's optimizer.is_paged says so);
    - transformers: is_gradient_checkpointing and gradient_checkpointing_enable/disable are deprecated (PEFT and
      TRL call them, not us: TRL's DPO around every reference forward)."""
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`gradient_checkpointing_(en|dis)able` is deprecated",
                            category=FutureWarning)


def setup_logging() -> None:
    """`[finetune] ...` lines on the current stderr (main() may run several times in one process)."""
    logger = logging.getLogger("finetune")
    for old in [h for h in logger.handlers if getattr(h, "_finetune", False)]:
        logger.removeHandler(old)  # its stream may be closed by now (not flushed: setStream would)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[finetune] %(message)s"))
    handler._finetune = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_notices()
    verb = argv.pop(0) if argv and "=" not in argv[0] and not argv[0].startswith("-") else "train"
    if "-h" in argv or "--help" in argv:
        print(verb_usage(verb) if verb in RUN_VERBS else usage())
        return 0

    from finetune import distributed
    from finetune.errors import Preempted, ReportedByMain, UserError

    world = distributed.world()
    try:
        return dispatch(verb, argv, world)
    except ReportedByMain:  # another process of an `accelerate launch` run, the main one, prints it
        return ReportedByMain.exit_code
    except UserError as e:
        # Under `accelerate launch` every process reads the same config: its errors are printed once, by rank 0.
        # Once they run together, an error in one process is that process's own: it says which.
        if world.is_main or distributed.joined():
            print(f"error: {'' if world.is_main else f'[rank {world.rank}] '}{e}", file=sys.stderr)
        return 2
    except Preempted as e:
        return preempted(e, argv, world)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def dispatch(verb: str, argv: list[str], world) -> int:
    """Run `verb`: on a finished run (run=...), or on the config composed from the recipe and overrides."""
    from finetune.errors import UserError, closest

    if verb not in VERBS:
        raise UserError(f"Unknown verb '{verb}'. Available: {', '.join(VERBS)}.{closest(verb, VERBS)}")
    if world.distributed and verb != "train":
        raise UserError(f"`{verb}` runs in one process: python -m finetune {verb} ... (accelerate launch is for "
                        "training).")
    if verb in RUN_VERBS and (verb not in ("eval", "prune") or any(a.startswith("run=") for a in argv)):  # or recipe=
        setup_logging()
        return run_verb(verb, argv)
    if "--cfg" in argv:
        return print_config(argv)
    refuse_options(argv)
    from finetune import registry

    setup_logging()
    if verb in ("distill", "plan"):  # teacher=X is distill.teacher=X
        argv = [f"distill.{a}" if a.startswith("teacher=") else a for a in argv]
    compared = [a.split("=", 1)[1] for a in argv if verb == "eval" and a.startswith("compare=")]
    cfg = registry.load_config([a for a in argv if not (verb == "eval" and a.startswith("compare="))])
    if compared:  # eval recipe=NAME compare=...: the base beside the models made from it
        from finetune.compare import compare
        from finetune.run import Run

        print_compare(*compare(Run.for_base(cfg), compared[-1]))
        return 0
    if verb == "distill" and not cfg.distill.teacher:
        raise UserError("distill needs its teacher: python -m finetune distill teacher=RUN_DIR|MODEL recipe=STUDENT "
                        "(a finished run's directory, or a model's Hub id or folder, with the student's tokenizer).")
    if verb == "plan":
        return plan_verb(cfg, argv)
    return {"data": data_verb, "eval": eval_base_verb, "prune": prune_verb}.get(verb, train_verb)(cfg, world)


def print_config(argv: list[str]) -> int:
    """--cfg job [--resolve]: the composed config as YAML."""
    from omegaconf import OmegaConf

    from finetune import registry
    from finetune.errors import UserError

    i = argv.index("--cfg")
    if argv[i + 1:i + 2] != ["job"]:
        raise UserError("--cfg takes 'job': python -m finetune recipe=NAME --cfg job")
    rest = [a for a in argv[:i] + argv[i + 2:] if a != "--resolve"]
    refuse_options(rest)
    print(OmegaConf.to_yaml(registry.compose(rest), resolve="--resolve" in argv), end="")
    return 0


def refuse_options(args: list[str]) -> None:
    """Everything but --cfg job, --resolve and --help is key=value: an option we do not know is an error."""
    from finetune.errors import UserError

    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise UserError(f"Unknown option {unknown[0]}: options are --cfg job, --resolve and --help; "
                        "everything else is key=value.")


def data_verb(cfg, world) -> int:
    from finetune.data.report import report

    report(cfg)
    return 0


def eval_base_verb(cfg, world) -> int:
    """`eval recipe=NAME`: the bare base model."""
    from finetune.eval import eval_base

    print_eval(*eval_base(cfg))
    return 0


def prune_verb(cfg, world, run=None) -> int:
    """`prune`: the smaller model, its figures before and after, and (prune.heal=sft) the healing run."""
    from finetune.prune import heal, prune

    out, report = prune(cfg, run)
    print(f"pruned: layers {report['dropped']} of {report['layers_before']} dropped, {report['params_before'] / 1e6:.3g}M -> "
          f"{report['params_after'] / 1e6:.3g}M parameters; before {report['before']}, after {report['after']}")
    print(f"written to {out} (a plain transformers model; prune.json says what was measured)")
    if report["plan"]:
        b, a = report["plan"]["before"], report["plan"]["after"]
        print(f"plan on the {report['plan']['gpu']}: training peak {b['train_peak_gib']:.2f} -> {a['train_peak_gib']:.2f} "
              f"GiB, {b['train_tokens_per_second']:,.0f} -> {a['train_tokens_per_second']:,.0f} tokens/s "
              f"({report['plan']['train_speedup']:.2f}x); decoding {b['decode_tokens_per_second']:,.0f} -> "
              f"{a['decode_tokens_per_second']:,.0f} tokens/s ({report['plan']['decode_speedup']:.2f}x)")
    healed = heal(cfg, out, run)
    if healed:
        print(f"healed (LoRA on the recipe's data): eval loss {healed['eval_loss']:.4g}, exact match "
              f"{healed.get('exact_match')}; run directory {cfg.output_dir}")
    return 0


def plan_verb(cfg, argv: list[str]) -> int:
    import json

    from finetune.plan import check_settings_given, make_plan, render

    check_settings_given(argv, cfg)
    plan = make_plan(cfg)
    print(json.dumps(plan, indent=2) if cfg.plan.format == "json" else render(plan))
    return 0


def train_verb(cfg, world) -> int:
    from finetune import pipeline

    summary = pipeline.train(cfg)
    if not world.is_main:
        return 0
    keys = ("eval_loss_base", "eval_loss", "exact_match_base", "exact_match", "preference_accuracy_base",
            "preference_accuracy", "train_runtime_s", "peak_memory_gb")
    print("\n".join(f"{k:>24}: {summary[k]:.4g}" for k in keys if isinstance(summary.get(k), (int, float))))
    run_dir = shlex.quote(os.path.abspath(cfg.output_dir))
    print(f"run directory: {run_dir}")
    print(f"next: python -m finetune generate run={run_dir} prompt='...'   (answers with the tuned model)\n"
          f"      python -m finetune eval run={run_dir}   (base against tuned, at each precision)")
    return 0


def preempted(e, argv: list[str], world) -> int:
    """A signal stopped training at a checkpoint: the command that resumes it."""
    from finetune.errors import Preempted

    if not world.is_main:
        return Preempted.exit_code
    again = [a for a in argv if a.split("=")[0] not in ("resume", "overwrite")]
    if not any(a.startswith("output_dir=") for a in again):
        again.append(f"output_dir={e.run_dir}")
    print(f"stopped by {e.signal_name} at step {e.step}; checkpoint saved in {e.checkpoint}. Resume with: "
          f"{launcher(world)} {' '.join(shlex.quote(a) for a in again + ['resume=true'])}", file=sys.stderr)
    return Preempted.exit_code


def launcher(world) -> str:
    """The command that started this process, up to our arguments: `python -m finetune`, or for a process of
    `accelerate launch` that launcher's own command line (read from its process, our parent), so that the
    printed resume command starts the same number of processes with the same config."""
    if world.strategy == "single":
        return "python -m finetune"
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode() for a in f.read().split(b"\0") if a]
        start, end = parent.index("launch"), parent.index("finetune")
        return " ".join(shlex.quote(a) for a in ["accelerate", *parent[start:end + 1]])
    except (OSError, ValueError):
        return f"accelerate launch --num_processes {world.size} [your --config_file] -m finetune"


def main_exit() -> None:
    """The `finetune` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
