"""TensorBoard curves of a training: one point per finished epoch, each written once, resumes included.

Each process that trains appends to an event file of its own (TensorBoard reads the files of a
folder in name order, as one run). An epoch is written after the state file names it, and a
process that resumes first writes the finished epochs its predecessor was killed before
writing, so each step is drawn once and a kill at any moment loses no point. Written with
TensorFlow's own record writer and protocol buffers: reading them needs TensorBoard, writing
them does not.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tnflow.tasks.store.layout import curves_dir

# tag -> the history record's field
CURVES = {
    "loss/train": "train_loss",
    "loss/valid": "valid_loss",
    "accuracy/train": "train_accuracy",
    "accuracy/valid": "valid_accuracy",
    "learning_rate": "learning_rate",
    "images_per_second": "images_per_second",
    "temperature": "temperature",
}


class Curves:
    """The event file of this process in a generation's curves folder, opened at its first epoch."""

    def __init__(self, generation: Path):
        self.directory = curves_dir(generation)
        self.written = written_epochs(self.directory)
        self.writer: Any = None

    def add(self, history: Iterable[dict[str, Any]]) -> None:
        """Write the epochs of `history` no event file of the generation holds yet, and flush them."""
        missing = [record for record in history if record["epoch"] not in self.written]
        if not missing:
            return
        import tensorflow as tf
        from tensorflow.core.framework.summary_pb2 import Summary
        from tensorflow.core.util.event_pb2 import Event

        if self.writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.tnflow"
            self.writer = tf.io.TFRecordWriter(str(self.directory / name))
            self.writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        for record in missing:
            values = [
                Summary.Value(tag=tag, simple_value=float(record[field]))
                for tag, field in CURVES.items()
                if record.get(field) is not None
            ]
            event = Event(wall_time=time.time(), step=int(record["epoch"]), summary=Summary(value=values))
            self.writer.write(event.SerializeToString())
            self.written.add(record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def written_epochs(directory: Path) -> set[int]:
    """The steps the event files in `directory` hold; a file cut short by a kill counts up to its last whole record."""
    import tensorflow as tf
    from tensorflow.core.util.event_pb2 import Event

    steps: set[int] = set()
    for path in sorted(directory.glob("events.out.tfevents.*")):
        try:
            for raw in tf.compat.v1.io.tf_record_iterator(str(path)):
                event = Event.FromString(raw)
                if event.HasField("summary"):
                    steps.add(int(event.step))
        except tf.errors.DataLossError:
            continue  # the rest of that file was cut short: its whole records are counted
    return steps
