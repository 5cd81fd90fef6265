"""Training: what training starts from, its resumable work directories, training and validation, and
the epochs a training reports to an Optuna trial (whose pruner may stop it).

May import: every room above it (core, config, store, sources, cache, tf).
"""
