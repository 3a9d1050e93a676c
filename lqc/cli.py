"""The ``lqc`` command: ``lqc passes``, ``recipes``, ``eval``, ``compress``, ``export``, ``auto``, ``sensitivity``, ``kv``, ``bench``, ``viz``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import cli_checks
from .cli_checks import recipe_arg
from .cli_auto import add_auto_parser, cmd_auto  # noqa: F401 (cmd_auto: run by name)
from .cli_export import add_export_parser, check_export, cmd_export  # noqa: F401 (cmd_export: run by name)


# recipes measured by the benchmarks (committed); the demo's own rows replace theirs on the page
COMMITTED_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "recipes"
RECIPE_ROWS_FROM_DEMO = ("float32 eager", "inductor bf16", "default", "max")


def cmd_passes(args) -> int:
    from lqc.passes import describe_options, registered_passes

    for name, cls in registered_passes().items():
        print(f"{name}: {cls.description}")
        if cls.requires:
            print(f"  requires: {', '.join(sorted(cls.requires))}")
        for row in describe_options(cls.Options):
            print(f"  {row['name']} ({row['type']}, default {row['default']}): {row['help']}")
        print()
    return 0


def cmd_recipes(args) -> int:
    from lqc.recipes import named_recipes, recipe_file, resolve_recipe

    if args.name:  # a name as its file says it (description included), a composition as composed
        data = resolve_recipe(args.name) if "+" in args.name else recipe_file(args.name)
        print(yaml.safe_dump(data, sort_keys=False, width=100), end="")
        return 0
    for name, description in named_recipes().items():
        print(f"{name}: {description}")
    return 0


def cmd_eval(args) -> int:
    import torch

    import lqc
    from lqc.data import bos_token, tokenize_file
    from lqc.evaluate import (
        FULL_WINDOWS, QUICK_WINDOWS, agreement, causal_lm_logits, eval_prompts, greedy_tokens, perplexity,
    )
    from lqc.passes.report import format_pass_changes, format_table

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, name = lqc.models.load(args.model)
    print(f"loaded {name} in {time.perf_counter() - started:.1f}s")
    if tokenizer is None:
        print("this model has no tokenizer; evaluation needs text", file=sys.stderr)
        return 2
    ids = tokenize_file(args.text, tokenizer)
    bos = bos_token(tokenizer)  # Gemma's windows and prompts start with BOS, as its calibration does
    max_windows = args.windows or (FULL_WINDOWS if args.full else QUICK_WINDOWS)
    recipe = recipe_arg(args.recipe)
    results: dict[str, Any] = {"model": name, "recipe": recipe, "text": str(args.text), "target": args.target}

    with torch.no_grad():
        reference = perplexity(causal_lm_logits(model), ids, window_length=args.window_length, max_windows=max_windows, desc="float32 eager",
                               bos=bos)
        compiled = lqc.compress(
            model, recipe, calibration=args.calibration, tokenizer=tokenizer, target=args.target,
            debug_dir=args.debug_dir, example_inputs=ids[: args.window_length][None],
        )
        candidate = perplexity(causal_lm_logits(compiled), ids, window_length=args.window_length, max_windows=max_windows, desc=f"lqc {args.recipe}",
                               bos=bos)
        results["reference"] = reference.to_json()
        results["lqc"] = candidate.to_json()
        if args.gen_prompts:
            prompts = eval_prompts(ids, args.gen_prompts, bos=bos)
            ref_tokens = greedy_tokens(model, prompts, args.gen_tokens)
            lqc_tokens = greedy_tokens(compiled, prompts, args.gen_tokens)
            results["agreement"] = agreement(ref_tokens, lqc_tokens).to_json()

    delta = (candidate.perplexity / reference.perplexity - 1) * 100
    rows = [
        ["float32 eager", f"{reference.perplexity:.4f}", str(reference.scored_tokens), "-", "-"],
        [f"lqc ({args.recipe})", f"{candidate.perplexity:.4f}", str(candidate.scored_tokens), f"{delta:+.3f}%",
         f"{results['agreement']['agreement']:.3f}" if "agreement" in results else "-"],
    ]
    print(f"\nperplexity on {args.text}: {max_windows} windows of {args.window_length} tokens")
    print(format_table(("variant", "perplexity", "scored tokens", "delta", "gen agreement"), rows), end="")
    print(format_pass_changes(lqc.session_of(compiled).reports), end="")
    if args.json:
        _write_json(args.json, results)
    return 0


def _profile_decode(model, args) -> int:
    import torch

    from lqc.bench import make_runner
    from lqc.decode_profile import format_profile, profile_decode

    torch.set_num_threads(args.threads)
    recipe = recipe_arg(args.recipe)
    profile = profile_decode(model, lambda: make_runner(model, "lqc", recipe, args.target).forward, recipe=str(args.recipe),
                             prompt_tokens=args.prompt_tokens, steps=args.profile_steps)
    print("\n" + format_profile(profile), end="")
    if args.json:
        _write_json(args.json, profile.to_json())
    return 0


def cmd_bench(args) -> int:
    import lqc
    from lqc.bench import format_bench, run_bench

    import torch

    model, _tokenizer, name = lqc.models.load(args.model, dtype=getattr(torch, args.dtype))
    if args.profile:
        return _profile_decode(model, args)
    result = run_bench(
        model, model_name=name, recipe=recipe_arg(args.recipe), target=args.target, variants=args.variants,
        prefill_tokens=args.prefill_tokens, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
        runs=args.runs, threads=args.threads,
    )
    print()
    print(format_bench(result), end="")
    if args.json:
        _write_json(args.json, result.to_json())
    return 0


def cmd_compress(args) -> int:
    import torch

    import lqc
    from lqc.passes.report import format_pass_changes

    torch.set_num_threads(args.threads)
    model, tokenizer, name = lqc.models.load(args.model)
    started = time.perf_counter()
    compressed = lqc.compress(model, recipe_arg(args.recipe), calibration=args.calibration, tokenizer=tokenizer)
    print(f"compressed {name} with {args.recipe} in {time.perf_counter() - started:.1f}s")
    print(format_pass_changes(lqc.session_of(compressed).reports), end="")
    out = lqc.save(compressed, args.out, tokenizer=tokenizer)
    print(f"saved to {out} ({sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6:.1f} MB); load it with lqc.load({str(out)!r}) or lqc.models.load({str(out)!r})")
    return 0


def cmd_sensitivity(args) -> int:
    import torch

    import lqc
    from lqc.data import calibration_from
    from lqc.ir import trace
    from lqc.passes import PassContext, PassManager
    from lqc.passes.report import format_table

    torch.set_num_threads(args.threads)
    model, tokenizer, name = lqc.models.load(args.model)
    calibration = calibration_from(args.calibration, tokenizer)
    window = calibration.windows(1, min(args.window_length, calibration.num_tokens), 1)[0]
    with torch.no_grad():
        graph = trace(model, window)
        entry = {"pass": "quantize", "format": args.format, "group_size": args.group_size, "keep_sensitive": 1,
                 "sensitivity_tokens": args.tokens, "include_lm_head": args.include_lm_head, "targets": args.targets}
        record = PassManager([entry]).run(graph, PassContext(calibration=calibration)).records[0]
    ranking = record.details.sensitivity
    print(f"\n{name}: relative error of the logits when one layer alone is quantized ({args.format}"
          f"{f', g{args.group_size}' if args.format == 'int4' else ''}; {args.tokens} calibration tokens)")
    rows = [[str(i + 1), row["layer"], f"{row['rel_error']:.5f}"] for i, row in enumerate(ranking[: args.top])]
    print(format_table(("rank", "layer", "rel error"), rows), end="")
    if args.json:
        _write_json(args.json, {"model": name, "entry": entry, "ranking": ranking})
    return 0


def cmd_kv(args) -> int:
    from lqc.runtime.kv.cache import kv_cache_report

    import lqc

    model, _tokenizer, name = lqc.models.load(args.model)
    options = dict(bits=args.bits or None, group=args.group, residual=args.residual, sinks=args.sinks, window=args.window)
    rows = [kv_cache_report(model.config, context, **options) for context in args.context]
    print(f"{name}: KV cache with {options}; float16 cache for comparison")
    print("| context | total MB | bytes/token | vs float16 | per quantized token | vs float16 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        quantized = (f"{r['bytes_per_quantized_token']:,.0f} | {r['per_quantized_token_vs_float']:.3f}x"
                     if r["bytes_per_quantized_token"] else "- | -")
        print(f"| {r['context']} | {r['total_bytes'] / 1e6:.2f} | {r['bytes_per_token']:,.0f} | {r['vs_float']:.3f}x | {quantized} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "options": options, "rows": rows}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from lqc.demo import format_demo, run_demo, use_cache_dir

    use_cache_dir(args.cache_dir)  # before torch compiles anything
    result = run_demo(model_name=args.model, cache_dir=args.cache_dir, windows=args.windows,
                      decode_tokens=args.decode_tokens, runs=args.runs, threads=args.threads)
    print()
    print(format_demo(result), end="")
    from lqc.tradeoff import load_results, write_tradeoff_page

    results = Path(result["cache_dir"]) / "results"
    rows = load_results(results) + [r for r in load_results(COMMITTED_RESULTS) if r["recipe"] not in RECIPE_ROWS_FROM_DEMO]
    page = write_tradeoff_page(rows, Path(result["cache_dir"]) / "tradeoff.html", title="lqc recipes on SmolLM2-135M")
    print(f"trade-off of every recipe measured so far: {_shown(page)}")
    print(f"demo took {result['seconds']:.0f}s; caches and results in {_shown(result['cache_dir'])}")
    return 0


def cmd_viz(args) -> int:
    import torch

    import lqc
    import lqc.viz

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, name = lqc.models.load(args.model)
    print(f"loaded {name} in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    calibration = args.calibration
    if tokenizer is None and calibration == "calib":
        print(f"{name} has no tokenizer: capturing on {args.tokens} random token ids")
        calibration = None
    made = lqc.viz.compressed_reports(model, recipe_arg(args.recipe), calibration=calibration, tokenizer=tokenizer,
                                      tokens=args.tokens)
    out = lqc.viz.write_html(made, args.out, title=f"lqc: {name}, recipe {args.recipe}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    made = [r for r in made if r.snapshots]
    if args.dot:
        dot = lqc.viz.export_dot(made[0], args.dot)
        print(f"wrote {dot}")
        if args.svg:
            print(f"wrote {lqc.viz.export_svg(dot, args.svg)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqc", description="lqc: a compression compiler for PyTorch transformers")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (registers your own passes); repeatable")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list registered passes with their options and defaults")
    _recipes_parser(sub)
    _eval_parser(sub)
    _compress_parser(sub)
    add_export_parser(sub)
    add_auto_parser(sub)
    _sensitivity_parser(sub)
    _kv_parser(sub)
    _bench_parser(sub)
    _demo_parser(sub)
    _viz_parser(sub)
    return parser


def _recipes_parser(sub) -> None:
    recipes = sub.add_parser("recipes", help="list the named recipes, or print one (or a composition: 'moe+int8')")
    recipes.add_argument("name", nargs="?")


def _eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="perplexity and greedy-generation agreement against float32 eager")
    evaluate.add_argument("--model", default="smollm2-135m")
    evaluate.add_argument("--recipe", default="default", help="named recipe, YAML file, or inline YAML")
    evaluate.add_argument("--text", default="eval", help="'eval' (shared eval.txt) or a text file")
    evaluate.add_argument("--calibration", default=None, help="'calib' (shared calib.txt) or a text file")
    evaluate.add_argument("--full", action="store_true", help="128 windows instead of the quick 16")
    evaluate.add_argument("--windows", type=int, default=None, help="number of windows (overrides --full)")
    evaluate.add_argument("--window-length", type=int, default=512)
    evaluate.add_argument("--target", default="eager", help="eager (default: quality only) | auto | inductor")
    evaluate.add_argument("--gen-prompts", type=int, default=4, help="prompts for generation agreement (0: skip)")
    evaluate.add_argument("--gen-tokens", type=int, default=32)
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--debug-dir", default=None)
    evaluate.add_argument("--json", default=None, help="also write the results here")


def _compress_parser(sub) -> None:
    compress = sub.add_parser("compress", help="compress a model and save it (lqc.save): safetensors + a JSON manifest")
    compress.add_argument("--model", default="smollm2-135m")
    compress.add_argument("--recipe", required=True, help="named recipe, YAML file, or inline YAML (cleanup and quantize passes)")
    compress.add_argument("--calibration", default=None, help="'calib' (shared calib.txt) or a text file")
    compress.add_argument("--out", required=True, help="directory to write")
    compress.add_argument("--threads", type=int, default=2)


def _sensitivity_parser(sub) -> None:
    sensitivity = sub.add_parser("sensitivity", help="rank linear layers by the output error of quantizing each alone")
    sensitivity.add_argument("--model", default="smollm2-135m")
    sensitivity.add_argument("--format", default="int4")
    sensitivity.add_argument("--group-size", type=int, default=64)
    sensitivity.add_argument("--include-lm-head", action="store_true")
    sensitivity.add_argument("--targets", nargs="*", default=[], help="rank only layers whose module path matches one of these regexes")
    sensitivity.add_argument("--calibration", default="calib", help="'calib' (shared calib.txt) or a text file")
    sensitivity.add_argument("--tokens", type=int, default=1024, help="calibration tokens the errors are measured on")
    sensitivity.add_argument("--window-length", type=int, default=512)
    sensitivity.add_argument("--top", type=int, default=20)
    sensitivity.add_argument("--threads", type=int, default=2)
    sensitivity.add_argument("--json", default=None)


def _kv_parser(sub) -> None:
    kv = sub.add_parser("kv", help="KV-cache bytes per token and in total at a context length, compressed vs float16")
    kv.add_argument("--model", default="smollm2-135m")
    kv.add_argument("--context", type=int, nargs="+", default=[2048])
    kv.add_argument("--bits", type=int, default=4, help="8, 4 or 2; 0: keep the tokens in float (eviction only)")
    kv.add_argument("--group", type=int, default=64)
    kv.add_argument("--residual", type=int, default=128)
    kv.add_argument("--sinks", type=int, default=4)
    kv.add_argument("--window", type=int, default=None, help="StreamingLLM: keep the sinks and the last WINDOW tokens")
    kv.add_argument("--json", default=None)


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="prefill/decode speed, sizes and compile times: eager, Inductor, lqc")
    bench.add_argument("--model", default="smollm2-135m")
    bench.add_argument("--recipe", default="default")
    bench.add_argument("--target", default="auto")
    from lqc.bench import DEFAULT_VARIANTS, VARIANTS

    bench.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                       help="lqc-unchecked: lqc without the per-call token-id check (its cost, in the same run)")
    bench.add_argument("--prefill-tokens", type=int, default=512)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--decode-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16 for cpu-fast, int4")
    bench.add_argument("--profile", action="store_true",
                       help="instead of the speed table: where one decode step of the lqc variant spends its time")
    bench.add_argument("--profile-steps", type=int, default=32, help="decode steps profiled (--profile)")
    bench.add_argument("--json", default=None, help="also write the results here")


def _demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="SmolLM2-135M: float32, Inductor bf16, lqc default and max in one table, and a trade-off page")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--cache-dir", default=".lqc-cache", help="Inductor's and lqc's caches, results and the trade-off page")
    demo.add_argument("--windows", type=int, default=8, help="eval.txt windows of 512 tokens for perplexity (a quick look)")
    demo.add_argument("--decode-tokens", type=int, default=32)
    demo.add_argument("--runs", type=int, default=2)
    demo.add_argument("--threads", type=int, default=2)


def _viz_parser(sub) -> None:
    viz = sub.add_parser("viz", help="one static HTML page: every pass's graph before/after, diff, provenance, per-node error")
    viz.add_argument("--model", default="smollm2-135m")
    viz.add_argument("--recipe", default="default", help="named recipe, YAML file, or inline YAML")
    viz.add_argument("--out", default="lqc-report.html")
    viz.add_argument("--calibration", default="calib", help="'calib' (shared calib.txt) or a text file: the capture's tokens")
    viz.add_argument("--tokens", type=int, default=64, help="calibration tokens the graph is captured and its errors measured on")
    viz.add_argument("--dot", default=None, help="also write the final graph as Graphviz DOT here")
    viz.add_argument("--svg", default=None, help="and render that DOT to SVG here (needs Graphviz's dot)")
    viz.add_argument("--threads", type=int, default=2)


def _write_json(path: str, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {_shown(path)}")


def _shown(path) -> str:
    """``path`` relative to the working directory when it lies under it (what the user typed)."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: list[str] | None = None) -> int:
    from lqc.ir.errors import LqcError

    args = build_parser().parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    try:
        # passes and recipes load no model: nothing to check first
        check = check_export if args.command == "export" else getattr(cli_checks, f"check_{args.command}", None)
        if check is not None:
            check(args)
        return globals()[f"cmd_{args.command}"](args)  # each subcommand NAME runs cmd_NAME
    except LqcError as exc:  # LqcConfigError among them
        print(f"lqc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
