"""Training: what training starts from, its resumable work directories, training and validation.

May import: every room above it (core, config, store, sources, cache, tf).
"""
