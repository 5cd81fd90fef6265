"""tnflow's work, in rooms by concern; imports run one way, down this list (`tests/test_layout.py`).

core      errors, atomic files and locks, progress, retries, cache keys, the GPU slot, processes
config    the option table, the specs stages take, the backbone table
store     the on-disk layout under the output and cache directories; which caches live runs read
sources   downloads, archives, CIFAR, image folders, splits, decoding pictures
cache     the HDF5 cache: format, reader, the cache stages, gc
tf        the only room that imports TensorFlow: graph, input pipeline, sessions, exports
training  the starting point, training and its epochs, validation
release   export, model card, champion gate, predictions, report
sweeps    trials of many configurations as flow runs, the leaderboard, the winner
"""
