"""``lqc auto --size 0.2 -o auto.yaml``: search one compression level per linear under a size budget
and write the choice as a recipe (lqc.auto), with a table of the levels chosen per block."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import yaml


def add_auto_parser(sub) -> None:
    auto = sub.add_parser("auto", help="search the best per-layer compression under a size budget; write it as a recipe")
    auto.add_argument("--model", default="smollm2-135m")
    budget = auto.add_mutually_exclusive_group(required=True)
    budget.add_argument("--size", type=float, help="budget: weight bytes as stored / float32 bytes, e.g. 0.2")
    budget.add_argument("--max-ppl-increase", type=float, metavar="PERCENT",
                        help="budget: the smallest size whose calibration perplexity stays within PERCENT of float32, e.g. 1")
    auto.add_argument("-o", "--out", required=True, help="the recipe to write (YAML)")
    auto.add_argument("--calibration", default="calib", help="'calib' (shared calib.txt) or a text file")
    auto.add_argument("--levels", nargs="+", default=None, help="levels to choose from (default: int4-g128 int4-g64 int4-g64+eora16 int8 float)")
    auto.add_argument("--method", default="gptq", choices=("gptq", "hqq", "rtn"), help="how int4 levels are quantized")
    auto.add_argument("--generations", type=int, default=20, help="evolution steps (~16 s each on SmolLM2, 2 threads)")
    auto.add_argument("--seed", type=int, default=0)
    auto.add_argument("--state", default=None, help="state file (default: OUT with .state.json): a rerun resumes from it")
    auto.add_argument("--no-verify", action="store_true", help="skip compiling the written recipe to measure it")
    auto.add_argument("--threads", type=int, default=2)


def cmd_auto(args) -> int:
    import torch

    import lqc
    from lqc.auto import DEFAULT_LEVELS, auto_recipe

    torch.set_num_threads(args.threads)
    model, tokenizer, name = lqc.models.load(args.model)
    out = Path(args.out)
    state = Path(args.state) if args.state else out.with_suffix(".state.json")
    started = time.perf_counter()
    with torch.no_grad():
        bound = args.max_ppl_increase / 100 if args.max_ppl_increase is not None else None
        result = auto_recipe(model, args.calibration, tokenizer=tokenizer, size=args.size, max_ppl_increase=bound,
                             levels=args.levels or DEFAULT_LEVELS,
                             method=args.method, generations=args.generations, seed=args.seed, state_path=state,
                             verify=not args.no_verify)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(result.recipe, sort_keys=False, width=120))
    print(level_table(result.config))
    for probe in result.probes:
        print(f"probe {probe['size']:.3f}x: calibration perplexity {probe['calibration_ppl']:.3f} (limit {probe['limit']:.3f})")
    counts = Counter(result.config.values())
    print(f"levels: {', '.join(f'{level} x{n}' for level, n in counts.most_common())}")
    print(f"bytes: {result.bytes:,} = {result.bytes / result.float_bytes:.3f}x float32 (budget {result.budget_bytes:,}); "
          f"search KL {result.search_kl:.4f} per token on calibration text")
    if result.verified:
        v = result.verified
        print(f"compiled recipe: {v['bytes']:,} bytes ({v['bytes'] / result.float_bytes:.3f}x), KL {v['kl']:.4f} "
              f"on {v['windows']} held-out calibration windows")
    print(f"wrote {out} (and its heat map {out.with_suffix('.html')}) in {time.perf_counter() - started:.0f}s; evaluate it: lqc eval --model {args.model} --recipe {out} "
          f"--calibration {args.calibration} --full")
    order = [lv.name for lv in result.table_order]
    out.with_suffix(".html").write_text(level_heatmap(result.config, order, f"lqc auto: {out.name}, {result.bytes / result.float_bytes:.3f}x float32"))
    out.with_suffix(".json").write_text(json.dumps({"config": result.config, "bytes": result.bytes, "float_bytes": result.float_bytes,
                                                    "search_kl": result.search_kl, "verified": result.verified, "probes": result.probes,
                                                    "history": result.state.history}, indent=1))
    return 0


def level_heatmap(config: dict[str, str], order: list[str], title: str) -> str:
    """A standalone HTML page: blocks x linears, each cell its level, colored from the fewest
    bytes (light) to the most (dark), ``order`` listing the levels that way."""
    from html import escape

    rows: dict[str, dict[str, str]] = {}
    for path, level in config.items():
        block, _, leaf = path.rpartition(".")
        rows.setdefault(block.rsplit(".", 1)[0] if block.endswith(("self_attn", "mlp")) else block, {})[leaf] = level
    columns = list(dict.fromkeys(leaf for row in rows.values() for leaf in row))
    shade = {level: 90 - 60 * i / max(len(order) - 1, 1) for i, level in enumerate(order)}
    cell = lambda lv: (f'<td style="background:hsl(210,60%,{shade[lv]:.0f}%);color:{"#000" if shade[lv] > 55 else "#fff"}">'  # noqa: E731
                       f"{escape(lv)}</td>") if lv else "<td>-</td>"
    body = "".join(f"<tr><th>{escape(b)}</th>{''.join(cell(r.get(c)) for c in columns)}</tr>" for b, r in rows.items())
    legend = " ".join(f'<span style="background:hsl(210,60%,{shade[lv]:.0f}%);padding:2px 6px">{escape(lv)}</span>' for lv in order)
    return (f"<!doctype html><meta charset=utf-8><title>{escape(title)}</title><style>body{{font:13px sans-serif}}"
            f"td,th{{padding:2px 6px;border:1px solid #ccc}}table{{border-collapse:collapse}}</style><h3>{escape(title)}</h3>"
            f"<p>{legend}</p><table><tr><th>block</th>{''.join(f'<th>{escape(c)}</th>' for c in columns)}</tr>{body}</table>")


def level_table(config: dict[str, str]) -> str:
    """Rows: blocks; columns: the linears of a block (q_proj, ..., down_proj); cells: levels."""
    rows: dict[str, dict[str, str]] = {}
    for path, level in config.items():
        block, _, leaf = path.rpartition(".")
        block = block.rsplit(".", 1)[0] if block.endswith(("self_attn", "mlp")) else block
        rows.setdefault(block, {})[leaf] = level
    columns = list(dict.fromkeys(leaf for row in rows.values() for leaf in row))
    width = max([len(c) for c in columns] + [len(v) for v in config.values()]) + 1
    lines = ["block".ljust(16) + "".join(c.ljust(width) for c in columns)]
    for block, row in rows.items():
        lines.append(block.rsplit("layers.", 1)[-1].ljust(16) + "".join(row.get(c, "-").ljust(width) for c in columns))
    return "\n".join(lines)
