"""Cache: the resized uint8 HDF5 file training reads, built once and reused.

The file format and its reader for training, what later stages read from a finished cache
(`contents`: only this room opens the file), the cache stage for CIFAR and for image folders
(incremental), and the collection of folder-cache versions nothing refers to.

May import: tasks.core, tasks.config, tasks.store, tasks.sources.
"""
