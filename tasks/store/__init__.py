"""Store: the on-disk layout under the output and cache directories, and who is reading what.

`layout` is the one module that joins paths under `--output-dir` and `--cache-dir` (run
directories, training work directories, champions and their predictions, sweeps, watch
records, batch predictions, cache files, stat indexes, unpacked archives); `in_use` records
which cache versions live runs read, so `tnflow gc` never removes one under a run; `records`
are the typed records written there (a champion's record and its line's history), each read and
written in one place, with a schema version.

May import: tasks.core, tasks.config.
"""
