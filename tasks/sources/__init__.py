"""Sources: where pictures come from, read safely.

Verified downloads, archives unpacked without escaping their directory, pickles that hold
nothing but arrays, CIFAR archives, image folders and their splits, and decoding any
picture a user has (with its resize kernels) in processes or on a Dask cluster.

May import: tasks.core, tasks.config, tasks.store.
"""
