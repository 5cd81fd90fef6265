"""TensorBoard curves: each finished epoch drawn once, whichever process drew it and wherever one was killed."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tnflow.tasks.store.layout import curves_dir
from tnflow.tasks.tf.curves import Curves, written_epochs


def history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "valid_loss": 2.5 / e,
            "train_accuracy": 0.1 * e,
            "valid_accuracy": 0.09 * e,
            "learning_rate": 1e-3 / e,
            "images_per_second": 100.0 + e,
            "temperature": 1.0 + e / 10,
        }
        for e in range(1, epochs + 1)
    ]


def drawn(generation) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(curves_dir(generation)))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_resumed_training_draws_what_its_killed_predecessor_had_not(tmp_path):
    first = Curves(tmp_path)
    first.add(history(1))
    first.add(history(2))  # epoch 1 again in the history: not drawn twice
    # Killed after its state named epoch 3, before drawing it: the next process draws 3, then 4.
    second = Curves(tmp_path)
    assert second.written == {1, 2}
    second.add(history(3))
    second.add(history(4))
    second.close()
    curves = drawn(tmp_path)
    assert set(curves) == {
        "loss/train", "loss/valid", "accuracy/train", "accuracy/valid", "learning_rate", "images_per_second",
        "temperature",
    }  # fmt: skip
    assert curves["accuracy/valid"] == [(e, round(0.09 * e, 6)) for e in (1, 2, 3, 4)]
    assert curves["learning_rate"] == [(e, round(1e-3 / e, 6)) for e in (1, 2, 3, 4)]
    assert len(list(curves_dir(tmp_path).iterdir())) == 2


def test_a_file_cut_short_by_a_kill_counts_its_whole_records(tmp_path):
    curves = Curves(tmp_path)
    curves.add(history(2))
    curves.close()
    (path,) = curves_dir(tmp_path).iterdir()
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the last epoch's record cut short
    assert written_epochs(curves_dir(tmp_path)) == {1}
    again = Curves(tmp_path)
    again.add(history(2))
    again.close()
    assert [step for step, _ in drawn(tmp_path)["loss/train"]] == [1, 2]


def test_no_history_writes_no_file(tmp_path):
    curves = Curves(tmp_path)
    curves.add([])
    curves.close()
    assert not curves_dir(tmp_path).exists()
