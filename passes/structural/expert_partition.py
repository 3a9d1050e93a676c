"""Cutting an FFN's neurons into equal-size experts from their activation patterns.

A neuron's activation pattern is the set of calibration tokens on which it is active (among the
token's most strongly activated neurons). Neurons that fire together belong in one expert: then a
token needs few experts to cover the neurons it uses (MoEfication, Zhang et al. 2022; CMoE, Pei
et al. 2025). The neurons active on most tokens are the shared experts, always on.

The routed neurons are clustered by balanced k-means: k-means where every cluster holds exactly
``size`` neurons. Its assignment step is a transportation problem (neurons to clusters, each
cluster taking ``size``), solved exactly as a min-cost flow by networkx.
"""

from __future__ import annotations

import networkx as nx
import torch

_COST_SCALE = 10_000  # network simplex wants integer costs: distances are scaled and rounded


def active_patterns(hidden: torch.Tensor, active_fraction: float) -> torch.Tensor:
    """[tokens, neurons] bool: per token, its ``active_fraction`` most strongly activated neurons."""
    neurons = hidden.shape[1]
    keep = max(1, min(neurons, round(active_fraction * neurons)))
    top = hidden.abs().topk(keep, dim=1).indices
    return torch.zeros_like(hidden, dtype=torch.bool).scatter_(1, top, True)


def balanced_assignment(cost: torch.Tensor, size: int) -> torch.Tensor:
    """Labels [n] minimising the total ``cost[i, label_i]`` with every label used ``size`` times
    (n = clusters x size): a min-cost flow source -> neuron -> cluster -> sink."""
    n, clusters = cost.shape
    if n != clusters * size:
        raise ValueError(f"{n} items cannot fill {clusters} clusters of {size}")
    scaled = cost - cost.min()
    scaled = (scaled / scaled.max().clamp_min(1e-12) * _COST_SCALE).round().to(torch.int64).tolist()
    flow = nx.DiGraph()
    flow.add_node("source", demand=-n)
    flow.add_node("sink", demand=n)
    for c in range(clusters):
        flow.add_edge(("c", c), "sink", capacity=size, weight=0)
    for i in range(n):
        flow.add_edge("source", ("n", i), capacity=1, weight=0)
        for c in range(clusters):
            flow.add_edge(("n", i), ("c", c), capacity=1, weight=scaled[i][c])
    _, flows = nx.network_simplex(flow)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        labels[i] = next(c for c in range(clusters) if flows[("n", i)][("c", c)] > 0)
    return labels


def balanced_kmeans(features: torch.Tensor, clusters: int, *, iterations: int = 8, seed: int = 0) -> torch.Tensor:
    """Labels [n] of equal-size clusters of the rows of ``features`` (squared Euclidean)."""
    n = features.shape[0]
    size = n // clusters
    features = features.to(torch.float32)
    # start from far-apart seed rows (farthest-point, from a seeded first pick), not from a random
    # partition: a random partition's centroids are all alike, and each row stays nearest the
    # centroid it is part of, so k-means would never leave it
    generator = torch.Generator().manual_seed(seed)
    seeds = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.cdist(features, features[seeds]).pow(2).min(dim=1).values
    for _ in range(clusters - 1):
        seeds.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, torch.cdist(features, features[seeds[-1:]]).pow(2)[:, 0])
    centroids = features[seeds]
    labels = None
    for _ in range(iterations):
        new = balanced_assignment(torch.cdist(features, centroids).pow(2), size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([features[labels == c].mean(dim=0) for c in range(clusters)])
    return labels


def partition_neurons(
    hidden: torch.Tensor, experts: int, shared: int, active_fraction: float, *, method: str = "cluster", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared neuron indices [shared x size], routed groups [experts - shared, size], activation
    rate per neuron [neurons]) for ``hidden`` [tokens, neurons] activations.

    ``method``: ``cluster`` (balanced k-means on activation patterns) or ``random`` (a seeded
    random balanced partition of the routed neurons: the baseline)."""
    neurons = hidden.shape[1]
    if neurons % experts:
        raise ValueError(f"{neurons} neurons do not split into {experts} equal experts")
    size = neurons // experts
    patterns = active_patterns(hidden, active_fraction)
    rate = patterns.float().mean(dim=0)
    order = rate.argsort(descending=True, stable=True)
    shared_idx = order[: shared * size].sort().values
    routed = order[shared * size :].sort().values
    routed_count = experts - shared
    if method == "random":
        labels = torch.randperm(len(routed), generator=torch.Generator().manual_seed(seed)) % routed_count
    elif method == "cluster":
        labels = balanced_kmeans(patterns[:, routed].T, routed_count, seed=seed) if routed_count > 1 else torch.zeros(len(routed), dtype=torch.long)
    else:
        raise ValueError(f"unknown partition method {method!r}: use cluster or random")
    groups = torch.stack([routed[labels == c].sort().values for c in range(routed_count)]) if routed_count else routed.new_zeros(0, size)
    return shared_idx, groups, rate
