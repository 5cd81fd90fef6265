"""Core: the Prefect and operating-system mechanics every stage stands on, and no ML.

Errors a user can act on, atomic files and locks, progress and stage timings, retry rules,
Prefect cache keys, the GPU slot and the host locks under it, processes that end with their
parent, and the Prefect server a command talks to.

May import: nothing of tnflow outside this room.
"""
