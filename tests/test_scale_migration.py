"""Scale migration x' = x / s, W' = W diag(s): exact wherever a producer can absorb 1/s."""

from __future__ import annotations

import torch

from lqc.ir import trace
from lqc.ir.linear import linear_sites
from lqc.passes.numerics import compare_outputs, run_graph
from lqc.passes.reparam.scale_migration import find_producer, migrate_scales


def _groups(graph):
    groups = {}
    for site in linear_sites(graph):
        groups.setdefault(site.x, []).append(site)
    return groups


def _migrate_everything(graph):
    migrated = []
    for x, sites in _groups(graph).items():
        producer = find_producer(graph, x, sites)
        if producer is None:
            continue
        scales = torch.rand(x.meta["val"].shape[-1], generator=torch.Generator().manual_seed(len(migrated))) * 4 + 0.25
        migrate_scales(graph, producer, sites, scales)
        migrated.append((producer.kind, [s.name(graph) for s in sites]))
    graph.prune_constants()
    graph.recompile()
    return migrated


def test_llama_norms_and_gated_product_are_exact(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    reference = run_graph(graph, (token_ids,))
    migrated = _migrate_everything(graph)
    kinds = [kind for kind, _ in migrated]
    # per block: input norm -> q/k/v, post-attention norm -> gate/up, up rows -> down; and the
    # final norm -> lm_head, through the head's row selection h[:, -k:, :]
    assert kinds.count("norm") == 5 and kinds.count("linear_rows") == 2
    assert ("norm", ["lm_head"]) in migrated
    assert ("norm", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]) in migrated
    assert ("linear_rows", ["model.layers.1.mlp.down_proj"]) in migrated
    rel, _ = compare_outputs(run_graph(graph, (token_ids,)), reference)
    assert rel <= 1e-5


def test_gpt2_layernorm_into_conv1d_is_exact(tiny_models, token_ids):
    graph = trace(tiny_models["tiny-gpt2"], token_ids)
    reference = run_graph(graph, (token_ids,))
    migrated = _migrate_everything(graph)
    assert [names for _, names in migrated] == [
        ["transformer.h.0.attn.c_attn"], ["transformer.h.0.mlp.c_fc"], ["transformer.h.1.attn.c_attn"], ["transformer.h.1.mlp.c_fc"],
        ["lm_head"],
    ]
    rel, _ = compare_outputs(run_graph(graph, (token_ids,)), reference)
    assert rel <= 1e-5


def test_no_producer_when_x_has_other_users(tiny_models, token_ids):
    # BERT is post-norm: a LayerNorm's output feeds the next block's q/k/v and its residual add
    graph = trace(tiny_models["tiny-bert"], token_ids)
    q_group = next(sites for sites in _groups(graph).values() if len(sites) == 3)
    assert find_producer(graph, q_group[0].x, q_group) is None
