"""lqc.viz: snapshots, per-node error, views and layouts, the report page, DOT/SVG export, the CLI."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

import lqc
import lqc.viz
from lqc.cli import main
from lqc.passes.numerics import compare_outputs, reference_names, tensor_error
from lqc.viz.html import module_rollup, read_page_data, render_html, report_data
from lqc.viz.layout import dot_layout, networkx_layout
from lqc.viz.views import build_view, child_combinations, collapsible_children, groups, to_dot

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed (apt-get install graphviz)")


@pytest.fixture
def int8_report(tiny_llama, token_ids, tmp_path):
    """The tiny Llama compressed with int8 through lqc.viz.report: (page path, GraphReport, final Graph)."""
    (report,) = lqc.viz.compressed_reports(tiny_llama, "int8", calibration=None, example_inputs=token_ids)
    path = lqc.viz.write_html([report], tmp_path / "report.html", title="lqc: tiny Llama, recipe int8")
    return path, report, tiny_llama


def _snapshot_nodes(snapshot):
    return {n["name"]: n for n in snapshot["nodes"]}


def test_snapshots_record_each_pass_with_provenance_and_bytes(int8_report):
    _path, report, _ = int8_report
    assert [(r.name, r.stage) for r in report.records] == [("cleanup", "recipe"), ("quantize", "recipe"),
                                                          ("pack_cpu_layouts", "lowering")]
    assert len(report.snapshots) == 4  # capture, then one per pass, the target's lowering included
    captured, final = (_snapshot_nodes(s) for s in (report.snapshots[0], report.snapshots[2]))
    qlinears = [n for n in final.values() if n["target"] == "lqc::qlinear"]
    assert len(qlinears) == 14  # 7 linears in each of 2 blocks; lm_head stays float
    for node in qlinears:
        assert node["provenance"]["pass"] == "quantize"
        source, *consts = node["provenance"]["from"]
        assert captured[source]["target"] == "linear"  # the linear it replaced, as captured, and its weight
        assert [captured[c]["op"] for c in consts] == ["get_attr"]
        assert node["block"] in (0, 1) and node["child"] in ("self_attn", "mlp")
        # its constants: int8 codes (one byte each) and scales; the linear read a float32 weight
        weight_bytes = sum(b for _attr, _shape, b in captured[source]["constants"])
        assert node["bytes"] == sum(b for _attr, _shape, b in node["constants"])
        assert weight_bytes / 4 <= node["bytes"] < weight_bytes / 3
    # removed nodes are the replaced linears (and constants they read, now unused)
    quantize = report.records[1]
    assert {n["provenance"]["from"][0] for n in qlinears} <= set(quantize.nodes_removed)
    # the lowering is a step of its own: each int8 qlinear becomes one in torch's packed CPU layout
    lowered = _snapshot_nodes(report.snapshots[3])
    packed = [n for n in lowered.values() if n["target"] == "lqc::qlinear"]
    assert len(packed) == 14 and all(n["provenance"]["pass"] == "pack_cpu_layouts" for n in packed)
    assert {n["provenance"]["from"][0] for n in packed} == {n["name"] for n in qlinears}
    assert set(report.records[2].nodes_removed) >= {n["name"] for n in qlinears}
    assert report.records[2].details.layers and len(report.records[2].details.layers) == 14


def test_qlinear_groups_show_the_kernel_target_triton_generates(int8_report):
    from lqc.codegen.kernel_cache import source_key

    _path, report, _ = int8_report
    # three kernels for the tiny Llama's 14 qlinears: GEMM, GEMM + residual add, GEMM + SwiGLU
    assert len(report.kernel_sources) == 3
    for key, source in report.kernel_sources.items():
        assert source_key(source) == key and "@triton.jit" in source and "dequant_gemm_tile" in source
    up = next(name for name, k in report.kernels.items() if k["role"] == "swiglu" and k["kind"] == "qlinear")
    entry = report.kernels[up]
    assert entry["in_kernel"] and "silu" in report.kernel_sources[entry["source"]].splitlines()[1]  # the epilogue comment
    assert entry["template"].startswith("lqc.codegen.qlinear_kernels: the dequant-GEMM (int8")


def test_node_errors_follow_provenance_and_match_the_output_error(int8_report):
    _path, report, _ = int8_report
    final = _snapshot_nodes(report.snapshots[-1])  # what runs: the errors describe the lowered graph
    errors = report.node_errors
    # before the first quantized linear nothing has changed: exact
    embedding = next(n for n in final.values() if n["target"] == "embedding")
    assert errors[embedding["name"]]["sqnr_db"] is None and errors[embedding["name"]]["cosine"] == 1.0
    # a qlinear is compared with the linear it replaced; int8 per-channel is far from float but close
    compressed = _snapshot_nodes(report.snapshots[2])
    for node in (n for n in final.values() if n["target"] == "lqc::qlinear"):
        error = errors[node["name"]]  # packed by the lowering, from quantize's qlinear, from the captured linear
        assert error["reference"] == compressed[node["provenance"]["from"][0]]["provenance"]["from"][0]
        assert 20 < error["sqnr_db"] < 80 and error["cosine"] > 0.99
    # the logits' entry is the error compare_outputs measures on the whole graph's output
    logits = next(n for n in final["output"]["inputs"] if final[n]["shape"].endswith(", 256]"))
    assert errors[logits]["cosine"] > 0.99 and errors[logits]["sqnr_db"] > 20
    assert "measured on the inputs this graph was compiled with" in report.error_inputs


def test_per_node_error_equals_the_output_comparison(tiny_llama, token_ids):
    torch._dynamo.reset()
    compressed = lqc.compress(tiny_llama, "int8", example_inputs=token_ids, viz=True, progress=False)
    report = lqc.session_of(compressed).reports[-1]
    (graph,) = compressed._lqc_compression.graphs
    # the graph also returns the KV cache: pick the output with one score per vocabulary entry
    logits = next(n.name for n in graph.output_node().args[0] if n.meta["val"].shape[-1] == tiny_llama.config.vocab_size)
    with torch.no_grad():
        rel, cos = compare_outputs([compressed(token_ids).logits], [tiny_llama(token_ids).logits])
    assert report.node_errors[logits]["rel_error"] == pytest.approx(rel, rel=1e-4)
    assert report.node_errors[logits]["cosine"] == pytest.approx(cos, abs=1e-6)


def test_node_errors_stop_at_the_activation_budget(tiny_llama, token_ids, monkeypatch):
    import functools

    import lqc.viz.annotate
    from lqc.passes.numerics import ActivationBudgetExceeded, node_errors

    compressed = lqc.compress(tiny_llama, "int8", example_inputs=token_ids, progress=False)
    (graph,) = compressed._lqc_compression.graphs
    reference = graph.copy()
    assert all(e["sqnr_db"] is None for e in node_errors(graph, reference, [token_ids], {}).values())  # itself: exact
    with pytest.raises(ActivationBudgetExceeded, match="fewer tokens"):
        node_errors(graph, reference, [token_ids], {}, max_bytes=10_000)
    # the report says why instead of failing the compile
    monkeypatch.setattr(lqc.viz.annotate, "node_errors", functools.partial(node_errors, max_bytes=10_000))
    report = lqc.passes.GraphReport(graph="g")
    lqc.viz.annotate.annotate_errors(report, graph, reference, [token_ids], "unused")
    assert not report.node_errors and report.error_inputs.startswith("not measured: ActivationBudgetExceeded")


def test_reference_names_walk_back_through_passes():
    sources = {"qlinear_1": ["fused_3"], "fused_3": ["linear_2", "linear_5"], "new_const": []}
    in_reference = {"linear_2", "linear_5", "add"}
    assert reference_names("add", sources, in_reference) == ["add"]
    assert reference_names("qlinear_1", sources, in_reference) == ["linear_2", "linear_5"]
    assert reference_names("new_const", sources, in_reference) == []


def test_tensor_error_values():
    ref = torch.tensor([3.0, 4.0])
    assert tensor_error(ref.clone(), ref) == {"sqnr_db": None, "cosine": pytest.approx(1.0), "rel_error": 0.0}
    noisy = tensor_error(torch.tensor([3.0, 4.5]), ref)
    assert noisy["sqnr_db"] == pytest.approx(10 * math.log10(25 / 0.25))
    assert noisy["rel_error"] == pytest.approx(0.1)


def test_views_collapse_blocks_and_expand_one_with_attention_and_mlp_clusters(int8_report):
    _path, report, _ = int8_report
    snapshot = report.snapshots[-1]
    assert set(groups(snapshot)) >= {"model.layers.0", "model.layers.1", "model.rotary_emb"}
    top = build_view(snapshot)
    assert {"g:model.layers.0", "g:model.layers.1"} <= set(top.boxes)
    assert not any(k.startswith("n:") and _snapshot_nodes(snapshot)[k[2:]]["block"] is not None for k in top.boxes)
    assert len(top.boxes) < 25 and not top.clusters
    expanded = build_view(snapshot, expanded=["model.layers.1"])
    assert "g:model.layers.1" not in expanded.boxes and "g:model.layers.0" in expanded.boxes
    assert {"c:model.layers.1", "c:model.layers.1.self_attn", "c:model.layers.1.mlp"} <= set(expanded.clusters)
    assert expanded.clusters["c:model.layers.1.mlp"] == ("mlp", "c:model.layers.1")
    nodes = _snapshot_nodes(snapshot)
    for key, cluster in expanded.placement.items():
        if key.startswith("n:") and nodes[key[2:]]["child"] == "mlp" and nodes[key[2:]]["block"] == 1:
            assert cluster == "c:model.layers.1.mlp"
    assert not any(nodes[k[2:]]["op"] == "get_attr" for k in expanded.boxes if k.startswith("n:"))  # constants fold into ops
    assert len(expanded.edges) == len(set(expanded.edges))
    # block 0 feeds block 1 through the residual stream: one edge from the collapsed box
    assert any(t == "g:model.layers.0" and h.startswith("n:") for t, h in expanded.edges)


@needs_dot
def test_dot_layout_places_every_box_cluster_and_edge(int8_report):
    _path, report, _ = int8_report
    view = build_view(report.snapshots[-1], expanded=["model.layers.0"])
    layout = dot_layout(to_dot(view))
    assert set(layout["boxes"]) == set(view.boxes)
    assert {c[0] for c in layout["clusters"]} == set(view.clusters)
    assert len(layout["edges"]) == len(view.edges)
    for x, y, w, h in layout["boxes"].values():
        assert 0 <= x - w / 2 and x + w / 2 <= layout["width"] + 1 and 0 <= y - h / 2 and y + h / 2 <= layout["height"] + 1
    # a node sits inside its cluster's rectangle
    clusters = {c[0]: c[2:] for c in layout["clusters"]}
    for key, cluster in view.placement.items():
        if cluster is not None:
            x, y, w, h = layout["boxes"][key]
            cx, cy, cw, ch = clusters[cluster]
            assert cx <= x <= cx + cw and cy <= y <= cy + ch
    assert all(re.fullmatch(r"M[\d.,]+(C[\d., ]+)+(L[\d.,]+)?", path) for _t, _h, path, _faint in layout["edges"])


def test_networkx_fallback_layout_is_layered(int8_report):
    _path, report, _ = int8_report
    view = build_view(report.snapshots[-1], expanded=["model.layers.0"])
    layout = networkx_layout(view)
    boxes = layout["boxes"]
    assert set(boxes) == set(view.boxes)
    for tail, head in view.edges:
        assert boxes[tail][1] < boxes[head][1]  # every edge points down a layer
    assert {c[0] for c in layout["clusters"]} == set(view.clusters)


def test_report_page_is_one_self_contained_file(int8_report):
    path, report, _ = int8_report
    page = path.read_text()
    assert page.startswith("<!doctype html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "<link" not in page and "@import" not in page
    data = read_page_data(path)
    (graph,) = data["graphs"]
    assert [p["name"] for p in graph["passes"]] == ["cleanup", "quantize", "pack_cpu_layouts"]
    assert len(graph["snapshots"]) == 4
    final = graph["snapshots"][-1]
    blocks = {"model.layers.0", "model.layers.1"}
    folded = {f"{b}|{c}" for b in blocks for c in (f"{b}.mlp", f"{b}.self_attn", f"{b}.mlp,{b}.self_attn")}
    assert set(final["views"]) == {""} | set(final["groups"]) | folded
    assert final["groups"]["model.layers.1"]["children"]["model.layers.1.mlp"]  # the MLP's nodes, for its folded box
    assert all(0 <= i < len(data["layouts"]) for s in graph["snapshots"] for i in s["views"].values())
    assert graph["kernels"] and graph["errors"]


def test_views_are_laid_out_once_per_distinct_drawing(int8_report):
    _path, report, _ = int8_report
    data = report_data([report], title="t", use_dot=False)
    captured = report.snapshots[0]
    distinct = {to_dot(build_view(s)) for s in report.snapshots} | {
        to_dot(build_view(s, [g], folded))
        for s in report.snapshots
        for g in groups(s)
        for folded in child_combinations(collapsible_children(captured, g))
    }
    assert len(data["layouts"]) == len(distinct)
    # quantize and the lowering changed only the blocks' insides: the collapsed top view is one drawing
    after_cleanup, after_quantize, after_lowering = data["graphs"][0]["snapshots"][1:]
    assert after_cleanup["views"][""] == after_quantize["views"][""] == after_lowering["views"][""]
    assert after_cleanup["views"]["model.layers.0"] != after_quantize["views"]["model.layers.0"]


def test_module_rollup_counts_constants_once_under_their_module(int8_report):
    _path, report, _ = int8_report
    rows = {path: (before, after) for path, before, after in module_rollup(report.snapshots[0], report.snapshots[-1])}
    assert rows["(all)"] == (report.capture_bytes, report.bytes_after)
    for block in ("model.layers.0", "model.layers.1"):
        before, after = rows[block]
        assert 0.25 <= after / before < 0.33  # int8 codes + per-channel scales; norm weights stay float32
        assert rows[f"{block}.self_attn"][0] + rows[f"{block}.mlp"][0] <= before
    untouched = [p for p in ("lm_head", "model.embed_tokens", "model.norm") if p in rows]  # int8 keeps them float
    assert untouched and all(rows[p][0] == rows[p][1] > 0 for p in untouched)


def test_debug_dir_writes_the_report_by_itself(tiny_llama, token_ids, tmp_path):
    compiled = torch.compile(tiny_llama, backend="lqc", options={"recipe": "int8", "target": "eager", "debug_dir": str(tmp_path)})
    with torch.no_grad():
        compiled(token_ids)
    (page,) = tmp_path.glob("graph*/report.html")
    assert (page.parent / "summary.txt").exists()
    data = read_page_data(page)
    assert [(p["name"], p["stage"]) for p in data["graphs"][0]["passes"]] == [
        ("cleanup", "recipe"), ("quantize", "recipe"), ("pack_cpu_layouts", "lowering")]
    assert data["graphs"][0]["annotated_step"] == 3  # groups and errors describe the graph that runs


def test_a_graph_with_a_symbolic_length_gets_snapshots_and_errors(tiny_llama, token_ids):
    compiled = torch.compile(tiny_llama, backend="lqc", options={"target": "eager", "recipe": "int8", "viz": True, "progress": False})
    token_ids = token_ids.clone()
    torch._dynamo.mark_dynamic(token_ids, 1)
    with torch.no_grad():
        compiled(token_ids)
    (report,) = lqc.session_of(compiled).reports
    assert not report.fallback and len(report.snapshots) == 4
    assert any("s" in n["shape"] for n in report.snapshots[-1]["nodes"])  # shapes stay symbolic in the page
    assert "[1, 12]" in report.error_inputs and len(report.node_errors) > 100  # measured on the actual 12 tokens


@needs_dot
def test_export_dot_and_svg(int8_report, tmp_path):
    _path, report, _ = int8_report
    dot = lqc.viz.export_dot(report, tmp_path / "g.dot")
    text = dot.read_text()
    assert text.startswith("digraph") and '"cluster_c:model.layers.1.mlp"' in text
    assert text.count("label=\"qlinear\"") == 14
    svg = lqc.viz.export_svg(dot, tmp_path / "g.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


def test_a_model_lqc_cannot_compress_gets_the_reasons(tmp_path):
    fell_back = lqc.passes.GraphReport(graph="graph7", fallback="CaptureError: unsupported op foo")
    with pytest.raises(lqc.LqcError, match="every graph fell back to Inductor .graph7: CaptureError: unsupported op foo"):
        report_data([fell_back], title="t")


def test_cli_checks_svg_before_any_work(capsys):
    assert main(["viz", "--model", "tiny-llama", "--svg", "x.svg"]) == 2
    captured = capsys.readouterr()
    assert "pass --dot too" in captured.err and "loaded" not in captured.out


def test_errors_name_the_fix(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="viz"):
        report_data([lqc.passes.GraphReport(graph="g")], title="t")
    with pytest.raises(lqc.LqcConfigError, match="snapshots"):
        lqc.viz.export_dot(lqc.passes.GraphReport(graph="g"), tmp_path / "x.dot")
    with pytest.raises(lqc.LqcConfigError, match="viz must be true or false"):
        lqc.CompileOptions.parse({"viz": "yes"})


def test_cli_writes_report_and_exports(tmp_path, capsys):
    out = tmp_path / "r.html"
    argv = ["viz", "--model", "tiny-llama", "--recipe", "int8", "--out", str(out), "--tokens", "10"]
    if shutil.which("dot"):
        argv += ["--dot", str(tmp_path / "r.dot"), "--svg", str(tmp_path / "r.svg")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "random token ids" in printed and f"wrote {out}" in printed
    assert out.stat().st_size < 2_000_000
    if shutil.which("dot"):
        assert (tmp_path / "r.svg").exists()


def test_render_escapes_the_title_and_round_trips_the_data(int8_report):
    _path, report, _ = int8_report
    data = report_data([report], title="</script><b>x", use_dot=False)
    page = render_html(data)
    assert page.count("</script>") == 2  # the data's and the code's own closing tags only
    assert "&lt;/script&gt;&lt;b&gt;x" in page
    assert json.loads(json.dumps(data)) == read_page_data_from_text(page)


def read_page_data_from_text(page: str) -> dict:
    import base64
    import gzip

    payload = re.search(r'<script id="lqc-data" type="application/octet-stream" data-encoding="gzip\+base64">(.*?)</script>', page, re.S)
    return json.loads(gzip.decompress(base64.b64decode(payload.group(1))))


def test_wide_fan_out_and_fan_in_leave_the_ranking():
    from lqc.viz.views import View

    view = View(boxes={k: k for k in ("n:mask", "n:a", "n:b", "n:c", "n:d", "n:out")})
    view.placement = {k: None for k in view.boxes}
    view.edges = [("n:mask", h) for h in ("n:a", "n:b", "n:c", "n:d")] + [(t, "n:out") for t in ("n:a", "n:b", "n:c", "n:d")]
    lines = [line.strip() for line in to_dot(view).splitlines() if "->" in line]
    # the mask's first reader and the output's last input keep their ranks; the rest are drawn only
    assert lines[0] == '"n:mask" -> "n:a";' and lines[7] == '"n:d" -> "n:out";'
    assert all(line.endswith("[constraint=false];") for line in lines[1:7])
    if shutil.which("dot"):
        assert [faint for *_rest, faint in dot_layout(to_dot(view))["edges"]] == [0, 1, 1, 1, 1, 1, 1, 0]


def test_attention_and_mlp_fold_inside_an_expanded_block(int8_report):
    _path, report, _ = int8_report
    captured, final = report.snapshots[0], report.snapshots[-1]
    assert collapsible_children(captured, "model.layers.1") == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    view = build_view(final, expanded=["model.layers.1"], folded=["model.layers.1.mlp"])
    assert view.boxes["g:model.layers.1.mlp"] == "mlp" and view.placement["g:model.layers.1.mlp"] == "c:model.layers.1"
    nodes = _snapshot_nodes(final)
    drawn = {k[2:] for k in view.boxes if k.startswith("n:")}
    assert not any(nodes[n]["block"] == 1 and nodes[n]["child"] == "mlp" for n in drawn)
    assert any(nodes[n]["block"] == 1 and nodes[n]["child"] == "self_attn" for n in drawn)
    assert "c:model.layers.1.mlp" not in view.clusters and "c:model.layers.1.self_attn" in view.clusters
    # the folded MLP reads the post-attention norm and feeds the residual add, like its nodes did
    assert any(h == "g:model.layers.1.mlp" for _t, h in view.edges) and any(t == "g:model.layers.1.mlp" for t, _h in view.edges)
