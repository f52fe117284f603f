"""Built-in strategy plugins, one module per strategy; each registers itself with ``clmtl.training.registry``."""
