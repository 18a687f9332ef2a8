"""``mmafm`` command line: run stages and pipelines, list models and stages, show configs.

    mmafm run 00_data -p vocab_size=4096            # one stage notebook via papermill
    mmafm run 02_text_pretrain --config configs/stages/02_text_pretrain.yaml -p max_steps=50
    mmafm pipeline run configs/pipelines/tiny.yaml  # all stages, outputs wired by manifests
    mmafm pipeline run configs/pipelines/tiny.yaml --run-id seeds --seeds 3  # once per seed
    mmafm list models | mmafm list stages | mmafm list models --params
    mmafm list models --params --family text --family ptmoe  # the text presets' shapes and KV cache
    mmafm config afm_2025_device                    # a model preset's config as YAML
    mmafm report runs/tiny                          # runs/tiny/REPORT.md: numbers + figures
    mmafm report --seeds runs/seeds-seed*           # runs/seeds/RESULTS.md: mean ± std
    mmafm numbers                                   # the reports' numbers, computed from configs
    mmafm generate runs/tiny/02_text_pretrain --prompt "The" --max-new-tokens 40
    mmafm eval runs/tiny/02_text_pretrain --tasks mmafm_cloze,mmafm_wordnet,mmafm_arith   # lm-eval
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

__all__ = ["main", "add_stage_arguments"]


def add_stage_arguments(parser: argparse.ArgumentParser, run_id_default: str) -> None:
    """What every way of running one stage takes (``mmafm run``, ``mmafm.launch``):
    ``STAGE [--config YAML] [-p KEY=VALUE ...] [--run-id ID] [--runs-dir DIR]``."""
    parser.add_argument("stage", help="stage name, e.g. 01_clip_pretrain (see `mmafm list stages`)")
    parser.add_argument("--config", help="YAML file of stage parameters")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (repeatable); values are read as YAML")
    parser.add_argument("--run-id", help=f"runs/<run-id>/<stage>; default: {run_id_default}")
    parser.add_argument("--runs-dir", default="runs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmafm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute one stage notebook with papermill")
    add_stage_arguments(run, run_id_default="a timestamp")
    run.add_argument("--force", action="store_true", help="re-run even if complete")
    run.add_argument("--log-output", action="store_true", help="stream cell output")

    pipe = sub.add_parser("pipeline", help="run a pipeline of stages")
    pipe_sub = pipe.add_subparsers(dest="pipeline_command", required=True)
    prun = pipe_sub.add_parser("run", help="run the stages of a pipeline YAML in order")
    prun.add_argument("file", help="e.g. configs/pipelines/tiny.yaml")
    prun.add_argument("--force", action="store_true", help="re-run complete stages too")
    prun.add_argument("--run-id", help="override the pipeline's run_id")
    prun.add_argument("--only", action="append", help="run only this stage (repeatable)")
    prun.add_argument("-p", "--param", action="append", default=[], metavar="STAGE.KEY=VALUE",
                      help="override a stage parameter, e.g. -p 02_text_pretrain.max_steps=20")
    prun.add_argument("--seeds", metavar="N|K,K,...",
                      help="run the pipeline once per seed (3 = seeds 0,1,2; or a list 0,4,7) into "
                           "RUNS/<run-id>-seed<k>/ with every stage's seed set, then write the mean "
                           "± std of the summary numbers to RUNS/<run-id>/RESULTS.md")

    lst = sub.add_parser("list", help="list model presets or stages")
    lst.add_argument("what", choices=("models", "stages"))
    lst.add_argument("pattern", nargs="?", default="*")
    lst.add_argument("--params", action="store_true",
                     help="models: a Markdown table with parameter counts (built on meta)")
    lst.add_argument("--family", action="append",
                     help="models: only this family (repeatable); text/ptmoe alone add the KV-cache columns")

    rep = sub.add_parser("report", help="write RUN_DIR/REPORT.md from the stages' manifests")
    rep.add_argument("run_dir", nargs="+", help="e.g. runs/tiny (with --seeds: one folder per seed)")
    rep.add_argument("--seeds", action="store_true",
                     help="aggregate the runs (one per seed): each summary number's mean ± std")
    rep.add_argument("--out", help="with --seeds: the Markdown file; default RUNS/<run-id>/RESULTS.md "
                                   "for folders named <run-id>-seed<k>")

    sub.add_parser("numbers", help="the reports' reproducible numbers, computed from the configs")

    cfg = sub.add_parser("config", help="print a model preset's config as YAML")
    cfg.add_argument("name")

    gen = sub.add_parser("generate", help="continue text prompts with a trained text model (KV cache)")
    gen.add_argument("source", help="a text-pretraining stage directory (e.g. runs/tiny/02_text_pretrain) "
                                    "or a text-model checkpoint (.safetensors)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    gen.add_argument("--tokenizer", help="tokenizer.model; default: the one the model was trained with")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, help="for sampling")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="weights and KV cache; bfloat16 decodes faster on CPU")
    gen.add_argument("--threads", type=int, help="torch.set_num_threads")

    ev = sub.add_parser("eval", help="score a text model on lm-eval tasks (local tasks: nothing downloads)")
    ev.add_argument("source", help="a text-pretraining stage directory or a text-model checkpoint (.safetensors)")
    ev.add_argument("--tasks", default="mmafm_cloze,mmafm_wordnet,mmafm_arith",
                    help="comma-separated: mmafm_cloze, mmafm_wordnet, mmafm_arith, mmafm_passkey, mmafm_needle, "
                         "mmafm_multikey, mmafm_vartrack (or any lm-eval task whose data is available offline)")
    ev.add_argument("--tokenizer", help="tokenizer.model; default: the one the model was trained with")
    ev.add_argument("--size", type=int, default=200, help="test items per local task (per length for long context)")
    ev.add_argument("--lengths", default="256,512,1024", help="long-context tasks: context lengths in tokens")
    ev.add_argument("--limit", type=int, help="at most this many items per task")
    ev.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--cache-dir", help="generated task data; default ~/.cache/mmafm/eval_tasks")
    ev.add_argument("--out", help="write lm-eval's results as JSON here")
    ev.add_argument("--threads", type=int, help="torch.set_num_threads")
    return parser


def _eval(args: argparse.Namespace) -> None:
    """``mmafm eval``: run lm-eval tasks on a text model, print lm-eval's table (and save it)."""
    from pathlib import Path

    import torch

    from mmafm.checkpoint import checkpoint_paths
    from mmafm.config import ConfigError
    from mmafm.eval.harness import evaluate_tasks, results_table, save_results

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.source).is_dir() and not checkpoint_paths(args.source)[0].is_file():
        raise ConfigError(f"{args.source}: no such stage directory or text-model checkpoint")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    try:
        lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    except ValueError as err:
        raise ConfigError(f"--lengths {args.lengths!r}: expected comma-separated integers") from err
    try:
        results = evaluate_tasks(args.source, tasks, tokenizer=args.tokenizer, size=args.size, seed=args.seed,
                                 lengths=lengths, num_fewshot=args.num_fewshot, limit=args.limit,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir)
    except (ValueError, FileNotFoundError) as err:  # unknown task, wrong model family, missing file
        raise ConfigError(str(err)) from err
    print(results_table(results))
    if args.out:
        print(f"[mmafm] results written to {save_results(results, args.out)}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    """``mmafm generate``: load the model and tokenizer of a text stage (or checkpoint), print the
    continuation of each prompt and the decode speed."""
    import time
    from pathlib import Path

    import torch

    from mmafm.checkpoint import checkpoint_paths, load_model, load_tokenizer_for
    from mmafm.config import ConfigError
    from mmafm.inference import generate_text
    from mmafm.registry import TEXT_FAMILIES

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.source).is_dir() and not checkpoint_paths(args.source)[0].is_file():
        raise ConfigError(f"{args.source}: no such stage directory or text-model checkpoint")
    model = load_model(args.source, dtype=getattr(torch, args.dtype), family=TEXT_FAMILIES)
    tokenizer = load_tokenizer_for(args.source, args.tokenizer, vocab_size=model.config.vocab_size)
    start = time.perf_counter()
    try:
        rows = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as err:  # prompt longer than the context, bad sampling settings
        raise ConfigError(str(err)) from err
    seconds = time.perf_counter() - start
    print("\n\n".join(row["prompt"] + row["completion"] for row in rows))  # each prompt, continued
    total = sum(row["tokens"] for row in rows)
    print(f"[mmafm] {total} tokens for {len(rows)} prompt(s) in {seconds:.2f} s "
          f"({total / seconds:.0f} tok/s, {args.dtype}, {torch.get_num_threads()} threads)", file=sys.stderr)


def _stage_overrides(pairs: list[str]) -> dict[str, dict]:
    from mmafm.config import ConfigError, parse_overrides

    out: dict[str, dict] = {}
    for key, value in parse_overrides(pairs).items():
        if "." not in key:
            raise ConfigError(f"pipeline override {key!r}: expected STAGE.KEY=VALUE")
        stage, name = key.split(".", 1)
        out.setdefault(stage, {})[name] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mmafm.checkpoint import CheckpointError
    from mmafm.config import ConfigError, parse_overrides, to_dict
    from mmafm.runner import StageFailed, parse_seeds, run_pipeline, run_stage
    from mmafm.stages.base import ManifestError

    try:
        if args.command == "run":
            run_stage(args.stage, args.config, parse_overrides(args.param), run_id=args.run_id,
                      runs_dir=args.runs_dir, force=args.force, log_output=args.log_output)
        elif args.command == "pipeline":
            run_pipeline(args.file, force=args.force, run_id=args.run_id, only=args.only,
                         overrides=_stage_overrides(args.param),
                         seeds=parse_seeds(args.seeds) if args.seeds else None)
        elif args.command == "list":
            if args.what == "models":
                from mmafm.registry import list_models, model_family, preset_table

                if args.params:
                    print(preset_table(args.pattern, include_tiny=True, family=args.family))
                else:
                    names = list_models(args.pattern)
                    families = set(args.family or ())
                    print("\n".join(n for n in names if not families or model_family(n) in families))
            else:
                from mmafm.stages import list_stages

                print("\n".join(list_stages()))
        elif args.command == "report":
            from mmafm.report import write_report, write_seed_report

            if args.seeds:
                print(f"[mmafm] results over seeds written to {write_seed_report(args.run_dir, args.out)}")
            else:
                if args.out:
                    raise ConfigError("--out goes with --seeds (a single run's report is RUN_DIR/REPORT.md)")
                for run_dir in args.run_dir:
                    print(f"[mmafm] report written to {write_report(run_dir)}")
        elif args.command == "numbers":
            from mmafm.report import reference_numbers

            print(reference_numbers())
        elif args.command == "config":
            from mmafm import get_config

            print(yaml.safe_dump(to_dict(get_config(args.name)), sort_keys=False), end="")
        elif args.command == "generate":
            _generate(args)
        elif args.command == "eval":
            _eval(args)
    except (ConfigError, ManifestError, CheckpointError, KeyError) as err:
        print(f"mmafm: error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"mmafm: stage failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
