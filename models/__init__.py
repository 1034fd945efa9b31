"""Reference DANet model, data, trainer and evaluator built on danet_ops (run from a checkout)."""
