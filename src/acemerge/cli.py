"""The ``acemerge`` command line: merge, methods, bench, inspect and demo."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from acemerge import __version__
from acemerge.errors import AceMergeError
from acemerge.parsing import parse_assignments, parse_kmb, parse_rank, parse_size


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="acemerge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"acemerge {__version__}")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's, one per core; acemerge "
                        "sets OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=1000 so they yield "
                        "on a shared machine)")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge fine-tuned experts into their base model",
                       description="acemerge merge CONFIG OUT (as mergekit-yaml), or flags")
    m.add_argument("config_file", nargs="?", metavar="CONFIG",
                   help="YAML merge config, acemerge's or mergekit's schema (as --config)")
    m.add_argument("out_folder", nargs="?", metavar="OUT", help="output folder (as --out)")
    m.add_argument("--config", help="YAML merge config (acemerge's or mergekit's schema)")
    m.add_argument("--base", help="base checkpoint: HF folder, file or hub id")
    m.add_argument("--expert", action="append", default=[], help="an expert (repeat)")
    m.add_argument("--method", help="merge method (default: ace)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter (repeat)")
    m.add_argument("--scale", type=float,
                   help="scaling coefficient lambda (default: the method's, 1.0 for ace)")
    m.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep matching parameters at the base value (repeat)")
    m.add_argument("--no-default-excludes", action="store_true",
                   help="drop the architecture's default exclusions")
    m.add_argument("--conv1d-as-stored", action="store_true",
                   help="merge GPT-2 Conv1D weights untransposed, as the ACE authors' code does")
    m.add_argument("--out-format", choices=["full", "lora"], default="full",
                   help="full: a merged model folder (default); lora: a PEFT LoRA adapter")
    m.add_argument("--out-rank", metavar="R|exact",
                   help="--out-format lora: rank per module, or exact (the update's numerical "
                   "rank; the default for methods whose update is low-rank)")
    m.add_argument("--allow-base-mismatch", action="store_true",
                   help="merge LoRA adapters whose adapter_config.json names another base")
    m.add_argument("--no-low-rank", action="store_true",
                   help="materialize LoRA experts' task vectors and run the method's dense "
                   "rule (same result; for comparison and timing)")
    m.add_argument("--statistics", action="append", default=[], metavar="FILE",
                   help="per-expert statistics file for regmean/fisher (repeat, in order)")
    m.add_argument("--dtype", help="output dtype (default: the base's)")
    m.add_argument("--compute-dtype", choices=["float32", "float64"], help="default float32")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    m.add_argument("--cuda", action="store_true", help="as --device cuda (mergekit's flag)")
    m.add_argument("--executor", choices=["local", "ray"],
                   help="where the work runs: local (default: this process, see --overlap) "
                   "or ray (tasks on a Ray cluster; same output)")
    m.add_argument("--overlap", choices=["auto", "on", "off"],
                   help="--executor local: overlap reading, merging and writing (default auto: "
                   "when torch's threads leave a CPU core free, or on CUDA)")
    m.add_argument("--ray-address", metavar="ADDR",
                   help="--executor ray: the cluster to join (default: start a local Ray)")
    m.add_argument("--workers", type=int, metavar="N",
                   help="--executor ray: tasks at once (default: every CPU, every GPU with "
                   "--device cuda)")
    m.add_argument("--max-in-flight", type=int, metavar="M",
                   help="--executor ray: units of work submitted and not yet written "
                   "(default 2 x workers); bounds the driver's memory")
    m.add_argument("--out", help="output folder")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    m.add_argument("--out-shard-size", metavar="SIZE",
                   help="mergekit's shard size (5B = 5e9 bytes; K, M, B suffixes)")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer files (default: yes)")
    m.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md (default: yes)")
    m.add_argument("--random-seed", type=int, metavar="N",
                   help="seed of the random methods (dare*, della*): their 'seed' parameter")
    for flag in ("--allow-crimes", "--lazy-unpickle", "--low-cpu-memory",
                 "--trust-remote-code"):
        m.add_argument(flag, action="store_true",
                       help="accepted for mergekit-yaml habits; no effect (acemerge always "
                       "streams one tensor at a time and runs no remote code)")
    m.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    m.add_argument("-v", "--verbose", action="count", default=0,
                   help="accepted for mergekit-yaml habits; acemerge prints the same")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    ms = sub.add_parser("methods", help="list the merge methods with their parameters")
    ms.add_argument("name", nargs="?", help="show one method only")

    b = sub.add_parser("bench", help="run the offline merge benchmark on a suite")
    b.add_argument("suite", help="digits, gpt2-text, gpt2-lora or minilm")
    b.add_argument("--methods", help="comma-separated methods (default: all)")
    b.add_argument("--data-free", action="store_true", help="skip RegMean and Fisher")
    b.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method parameter (repeat)")
    b.add_argument("--sweep", metavar="METHOD.KEY=V1,V2,...",
                   help="one row per value (KEY may be scale; ace.ablation=E1,E2,E3,E4)")
    b.add_argument("--eps-study", action="store_true",
                   help="ACE's eps study: paper default, eps=paper, eps=auto rules, relative "
                   "and absolute sweeps, oracle-best eps, and the compared methods")
    b.add_argument("--no-tune", action="store_true", help="skip the validation-tuned lambda rows")
    b.add_argument("--tiny", action="store_true", help="the small CI variant of the suite")
    b.add_argument("--seed", type=int, default=0, help="training seed of the suite (default 0)")
    b.add_argument("--cache", help="cache folder for trained experts "
                   "(default $ACEMERGE_CACHE or ~/.cache/acemerge)")
    b.add_argument("--out", help="folder for the markdown, CSV, JSON and PNG reports")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    i = sub.add_parser("inspect", help="per-layer heterogeneity of experts, with figures")
    i.add_argument("--base", required=True, help="base checkpoint: HF folder, file or hub id")
    i.add_argument("--expert", action="append", default=[], required=True,
                   help="an expert (repeat)")
    i.add_argument("--tau", type=float, default=0.3,
                   help="heterogeneity threshold on gamma (default 0.3, the paper's)")
    i.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave matching parameters out (repeat)")
    i.add_argument("--out", help="folder for gamma.png and spectrum.png")

    d = sub.add_parser("demo", help="the digits benchmark with every data-free method")
    d.add_argument("--out", default="bench-out/demo", help="report folder")
    return parser


def _positional_merge_args(args: argparse.Namespace) -> None:
    """``acemerge merge CONFIG OUT`` (mergekit-yaml's form) into --config / --out."""
    for name, flag in (("config_file", "config"), ("out_folder", "out")):
        value = getattr(args, name)
        if value is not None:
            if getattr(args, flag):
                raise AceMergeError(f"give the {flag} once: positional {value!r} and "
                                    f"--{flag} {getattr(args, flag)!r}")
            setattr(args, flag, value)
    if args.cuda:
        if args.device and args.device != "cuda":
            raise AceMergeError(f"--cuda contradicts --device {args.device}")
        args.device = "cuda"


def config_from_args(args: argparse.Namespace) -> Any:
    """A validated MergeConfig from ``--config`` or from the flags."""
    from acemerge.config import EXECUTION_FIELDS, build_config
    from acemerge.mergekit_schema import load_any_config as load_config

    if args.config:
        given = [flag for flag, value in (("--base", args.base), ("--expert", args.expert),
                 ("--method", args.method), ("--set", args.set), ("--scale", args.scale),
                 ("--exclude", args.exclude), ("--dtype", args.dtype),
                 ("--statistics", args.statistics)) if value]
        if given:
            raise AceMergeError(f"--config cannot be combined with {given[0]}")
        cfg = load_config(args.config)
    else:
        if not args.base:
            raise AceMergeError("--base is required (or give --config)")
        fields: dict[str, Any] = {
            "merge_method": args.method or "ace", "base_model": args.base,
            "models": args.expert, "parameters": parse_assignments(args.set),
            "exclude": args.exclude, "dtype": args.dtype, "statistics": args.statistics,
        }
        if args.scale is not None:
            fields["scale"] = args.scale
        cfg = build_config(**fields)
    updates = {"default_excludes": False} if args.no_default_excludes else {}
    if args.conv1d_as_stored:
        updates["conv1d_as_stored"] = True
    if args.compute_dtype:
        updates["compute_dtype"] = args.compute_dtype
    if args.allow_base_mismatch:
        updates["allow_base_mismatch"] = True
    if args.device:
        updates["device"] = args.device
    if args.no_low_rank:
        updates["low_rank"] = False
    updates.update(_executor_updates(args))
    updates.update(_seed_updates(cfg, args.random_seed))
    if args.out_format != "full" or args.out_rank is not None:
        updates["out_format"] = args.out_format
        updates["out_rank"] = parse_rank(args.out_rank)
    if {"out_format", *EXECUTION_FIELDS} & set(updates):
        return build_config(**{**cfg.model_dump(), **updates})  # revalidated as a whole
    return cfg.model_copy(update=updates) if updates else cfg


def _executor_updates(args: argparse.Namespace) -> dict[str, Any]:
    """--executor, --overlap and the Ray options, as config fields (those given)."""
    from acemerge.config import RAY_FIELDS

    given = {"executor": args.executor, "overlap": args.overlap,
             "ray_address": args.ray_address, "workers": args.workers,
             "max_in_flight": args.max_in_flight}
    updates = {key: value for key, value in given.items() if value is not None}
    if args.executor == "local":  # a config file's Ray options no longer apply
        updates = {**dict.fromkeys(RAY_FIELDS), **updates}
    if args.executor == "ray":  # nor a config file's overlap
        updates.setdefault("overlap", "auto")
    return updates


def _seed_updates(cfg: Any, seed: int | None) -> dict[str, Any]:
    """--random-seed as the 'seed' parameter of methods that draw random masks."""
    from acemerge import methods

    if seed is None or "seed" not in methods.get(cfg.merge_method).params.model_fields:
        return {}
    updates: dict[str, Any] = {"parameters": {**cfg.parameters, "seed": seed}}
    if cfg.mergekit:
        shared = {**cfg.mergekit.get("parameters", {}), "seed": seed}
        updates["mergekit"] = {**cfg.mergekit, "parameters": shared}
    return updates


def kept_summary(plan: Any) -> str:
    """One line: which parameters the plan keeps at the base value."""
    from acemerge.plan import Treatment

    kept = [e.name for e in plan.entries if e.treatment is Treatment.KEEP]
    if not kept:
        return "kept at the base value: nothing (every parameter is merged)"
    shown = ", ".join(kept[:4]) + (f", ... ({len(kept)} in all)" if len(kept) > 4 else "")
    return f"kept at the base value: {shown} (see --dry-run; --no-default-excludes merges them)"


def cmd_merge(args: argparse.Namespace) -> int:
    from acemerge import methods
    from acemerge.api import format_plan, merge_from_config, open_inputs, plan_for

    _positional_merge_args(args)
    cfg = config_from_args(args)
    method = methods.get(cfg.merge_method)
    if not cfg.mergekit:  # mergekit configs resolve their parameters per tensor
        method.validate(cfg.parameters)
    if args.dry_run:
        base, _ = open_inputs(cfg)
        print(format_plan(plan_for(cfg, base), cfg.merge_method))
        return 0
    if not args.out:
        raise AceMergeError("--out is required (or: acemerge merge CONFIG OUT)")
    shard_bytes = (parse_kmb(args.out_shard_size) if args.out_shard_size
                   else parse_size(args.max_shard_size))
    if not args.quiet:
        base, _ = open_inputs(cfg)
        print(kept_summary(plan_for(cfg, base)), file=sys.stderr)
    result = merge_from_config(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet,
                               max_shard_bytes=shard_bytes,
                               other_inputs=[args.config] if args.config else [],
                               copy_tokenizer=args.copy_tokenizer,
                               write_card=args.write_model_card)
    if not args.quiet:
        print(f"merged {len(result.plan.entries)} parameters with {cfg.merge_method} "
              f"in {result.seconds:.1f} s -> {result.out}")
    return 0


def lora_handling(method: Any) -> str:
    """How a method merges LoRA experts, for ``acemerge methods``."""
    if method.low_rank_rule is None:
        return "task vectors materialized one parameter at a time"
    unless = f" (materialized with {method.low_rank_except})" if method.low_rank_except else ""
    return "merged in factored (low-rank) form" + unless


def cmd_methods(args: argparse.Namespace) -> int:
    from acemerge import methods

    for name in [methods.get(args.name).name] if args.name else methods.available():
        method = methods.get(name)
        title = f" ({method.title})" if method.title != name else ""
        print(f"{name}{title}: {method.summary}")
        print(f"  paper: {method.paper}")
        print(f"  default scale: {method.default_scale:g}; non-matrix parameters: "
              f"{method.other_rule_name}")
        print("  LoRA experts: " + lora_handling(method))
        for pname, field in method.params.model_fields.items():
            setting = f"{pname}={field.default}"
            print(f"  {setting:<30} {field.description or ''}".rstrip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build (or reuse) the fastest suite and merge it with every data-free method."""
    return cmd_bench(argparse.Namespace(
        suite="digits", methods=None, data_free=True, set=[], sweep=None, no_tune=False,
        eps_study=False,
        tiny=False, seed=0, cache=None, out=args.out, quiet=False))


def parse_method_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``method.key=value`` pairs grouped by method."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(items).items():
        method, dot, param = key.partition(".")
        if not dot or not param:
            raise AceMergeError(f"--set expects method.key=value, got {key!r}")
        grouped.setdefault(method, {})[param] = value
    return grouped


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from acemerge.bench import cache_root, get_suite
    from acemerge.bench.cli import run_bench_command

    suite = get_suite(args.suite)
    cache = Path(args.cache) if args.cache else cache_root()
    built = suite.build(cache, seed=args.seed, tiny=args.tiny, progress=not args.quiet)
    out = Path(args.out) if args.out else None
    print(run_bench_command(built, args.methods, args.data_free,
                            parse_method_settings(args.set), args.sweep, not args.no_tune, out,
                            progress=not args.quiet, eps_study=args.eps_study))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from acemerge import inspect as diagnostics
    from acemerge.api import open_inputs, plan_for
    from acemerge.config import build_config

    cfg = build_config(base_model=args.base, models=args.expert, exclude=args.exclude)
    base, experts = open_inputs(cfg)
    plan = plan_for(cfg, base)
    rows = diagnostics.layer_stats(base, experts, plan, args.tau)
    print(diagnostics.format_layer_table(rows, args.tau))
    if args.out:
        for path in diagnostics.write_figures(base, experts, plan, rows, Path(args.out),
                                              args.tau):
            print(f"wrote {path}")
    return 0


COMMANDS = {"merge": cmd_merge, "methods": cmd_methods, "demo": cmd_demo,
            "bench": cmd_bench, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input ends with one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise AceMergeError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except AceMergeError as exc:
        print(f"acemerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("acemerge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("ACEMERGE_DEBUG"):
            raise
        text = " ".join(str(exc).split())
        print(f"acemerge: internal error: {type(exc).__name__}: {text} "
              "(set ACEMERGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
