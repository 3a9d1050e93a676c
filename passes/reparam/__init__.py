"""Reparameterization: exact rewrites that change how weights are stored, not what the model
computes (cleanup, folded norms and batch norms, concatenated linears, merged adapters and
branches, rotations, scale migration)."""

from lqc.passes.reparam import cleanup, concat_linears, fold_batchnorm, fold_norms, merge_adapters, merge_branches, rotate  # noqa: F401
