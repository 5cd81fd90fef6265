"""A champion line's records: the current champion's and the history of its promotions.

Where they live (`current/champion.json`, `history.jsonl` in the line's directory) is
`tasks.store.layout`'s; what a record holds is `tasks.store.records.ChampionRecord`.

A record torn or damaged by a crash never closes the gate for good: `read_champion` rebuilds
it from the history, or sets it aside (no champion), with a warning either way.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.store.layout import champion_history, champion_line, champion_record, current_champion
from tnflow.tasks.store.records import ChampionRecord, read_champion_file, read_history_rows, write_champion_file


def read_history(line: Path) -> list[ChampionRecord]:
    """Every promotion of a champion line so far, oldest first (a row torn by a crash is left out)."""
    path = champion_history(line)
    records, damaged = read_history_rows(path)
    if damaged:
        run_logger().warning("%s has damaged lines; they are left out of the champion's history", path)
    return records


def read_champion(output_dir: str | Path, key: str) -> ChampionRecord | None:
    """The champion's record; a damaged one is rebuilt from the line's history, or set aside (no champion)."""
    line = champion_line(output_dir, key)
    path = champion_record(current_champion(line))
    if not path.is_file():
        return None
    record = read_champion_file(path)
    if record is not None and record.test_split:
        return record
    run_id = path.parent.resolve().name
    recorded = [r for r in read_history(line) if r.run_id == run_id]
    aside = path.with_name(f"{path.name}.damaged")
    with contextlib.suppress(FileNotFoundError):  # another run set it aside first
        os.replace(path, aside)
    if recorded:
        write_champion_file(path, recorded[-1])
        run_logger().warning("%s was damaged (kept as %s): rebuilt from history.jsonl", path, aside.name)
        return recorded[-1]
    run_logger().warning("%s was damaged (kept as %s) and is not in history.jsonl: no champion", path, aside.name)
    return None
