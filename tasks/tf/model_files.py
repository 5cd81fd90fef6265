"""A model directory's files: a TensorFlow checkpoint plus model.json that says how to rebuild it.

model.json records the model, head, image size, class names and preprocessing, so `validate`
and `predict` rebuild the graph from the directory alone, and the epoch, metrics and training
configuration, so a model can be traced back to the run that made it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import TnflowError, first_line
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.tf.startup import start_tensorflow

MODEL_JSON = "model.json"
CHECKPOINT = "model.ckpt"
FORMAT = "tnflow-model/1"


class ModelRecord(BaseModel):
    """model.json: how to rebuild the model, and where it came from.

    `format` is its schema version. Fields added since a directory was written take their
    defaults here (a model from before folders was fed square CIFAR pictures: `crop` leaves
    them as they are; one from before calibration divides by 1), so every model directory an
    earlier release wrote still loads; fields this release does not know (`extra`) are kept.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    format: str = FORMAT
    model: str
    head: str
    num_classes: int
    image_size: int
    class_names: list[str]
    tta: str = "none"
    resize: str = "crop"  # how its pictures were made square (`tasks.sources.resize`)
    preprocessing: str = ""  # what the graph does to a picture before the backbone, in words
    temperature: float = 1.0  # divides the logits of every probability given out
    calibration: dict[str, Any] | None = None  # whether a fitted temperature was applied, and why
    epoch: int | None = None
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    reference: dict[str, Any] | None = None  # its test split's confidence, which drift compares with
    card: dict[str, Any] = {}  # the model card's facts (`tasks.release.model_card`)
    checkpoint: str = CHECKPOINT


def write_model_json(directory: Path, meta: dict[str, Any]) -> None:
    record = _record(directory / MODEL_JSON, {**meta, "format": FORMAT, "checkpoint": CHECKPOINT})
    (directory / MODEL_JSON).write_text(record.model_dump_json(indent=2))


def update_model_json(directory: Path, updates: dict[str, Any]) -> None:
    """Add to model.json by replacing the file (in a directory of hard links, the original stays as it was)."""
    meta = json.loads((directory / MODEL_JSON).read_text())
    record = _record(directory / MODEL_JSON, {**meta, **updates})
    write_atomic(directory / MODEL_JSON, json.dumps(record.model_dump(exclude_unset=True), indent=2))


def _record(path: Path, meta: dict[str, Any]) -> ModelRecord:
    try:
        return ModelRecord.model_validate(meta)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise TnflowError(f"{path}: {where}: {error['msg']}; the model directory is damaged") from None


def read_model_dir(path: str | Path) -> ModelRecord:
    """model.json of a model directory, or a clear error saying what `path` is instead."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise TnflowError(f"{path} is not a tnflow model directory (no {MODEL_JSON}); pass <run dir>/model or champion")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise TnflowError(f"{meta_path} is unreadable ({exc}); the model directory is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TnflowError(f"{meta_path} has format {found!r}, expected {FORMAT!r}")
    if not (path / f"{CHECKPOINT}.index").is_file():
        raise TnflowError(f"{path} has no checkpoint {CHECKPOINT}; the model directory is incomplete")
    return _record(meta_path, meta)


def restore_model(saver: Any, session: Any, path: str | Path) -> None:
    """Restore a model directory's weights into `session`, or say in one line that its checkpoint is damaged.

    The checkpoint is checked first (`check_checkpoint`), so a copy cut short or a lost data
    file is named as such; whatever TensorFlow still finds wrong while restoring is one line too.
    """
    import tensorflow as tf

    prefix = Path(path) / CHECKPOINT
    check_checkpoint(prefix)
    try:
        saver.restore(session, str(prefix))
    except (tf.errors.OpError, ValueError) as exc:
        raise TnflowError(f"{_damaged(prefix)}: TensorFlow cannot restore it ({first_line(exc)}); {_AGAIN}") from None


_AGAIN = "copy the model directory again from where it came from, or train it again"


def _damaged(prefix: Path) -> str:
    return f"the model directory {prefix.parent} is damaged"


def check_checkpoint(prefix: Path) -> None:
    """The checkpoint's data files are all there and hold as many bytes as its index names.

    TensorFlow reads the index alone when it opens a checkpoint, and meets a missing or cut
    data file only in the middle of a restore, as a long traceback. Numeric tensors are stored
    back to back, so their shapes and types give the data's exact size; a checkpoint with
    string tensors is only checked not to be shorter.
    """
    start_tensorflow()  # quietly, even where a stage checks a model before TensorFlow is started (--init-from)
    from tensorflow.python.training import py_checkpoint_reader

    try:
        reader = py_checkpoint_reader.NewCheckpointReader(str(prefix))
    except Exception as exc:  # noqa: BLE001 - any failure to read the index is a damaged directory
        unreadable = f"its index {prefix.name}.index is unreadable ({first_line(exc)})"
        raise TnflowError(f"{_damaged(prefix)}: {unreadable}; {_AGAIN}") from None
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    numeric = all(dtype.name != "string" for dtype in dtypes.values())
    expected = sum(math.prod(shapes[name]) * dtypes[name].size for name in shapes if dtypes[name].name != "string")
    files = {f.name: f.stat().st_size for f in prefix.parent.glob(f"{prefix.name}.data-*-of-*")}
    shards = {name.rsplit("-of-", 1)[1] for name in files} or {"00001"}
    wanted = [f"{prefix.name}.data-{i:05d}-of-{n}" for n in sorted(shards) for i in range(int(n))]
    missing = [name for name in wanted if name not in files]
    if missing or len(shards) > 1:
        lost = f"no data file {missing[0]}" if missing else "data files of two saves"
        raise TnflowError(f"{_damaged(prefix)}: its checkpoint has {lost}; {_AGAIN}")
    size = sum(files.values())
    if size < expected or (numeric and size != expected):
        raise TnflowError(
            f"{_damaged(prefix)}: its checkpoint's data is {size:,} bytes where its index names {expected:,} "
            f"(cut short, or from another save); {_AGAIN}"
        )


def model_digest(path: str | Path) -> str:
    """Identifies a model's weights without reading them: model.json plus the checkpoint index,
    which holds a checksum of every tensor. The model card (`card`) is left out: exporting a
    champion again or recording a promotion does not make it another model."""
    path = Path(path)
    meta = json.loads((path / MODEL_JSON).read_text())
    meta.pop("card", None)
    return short_digest(json.dumps(meta, sort_keys=True).encode() + (path / f"{CHECKPOINT}.index").read_bytes())


def check_can_start_from(path: str | Path, model: str, head: str, class_names: list[str]) -> None:
    """A model to continue training from must have this backbone, head and class list, and a whole checkpoint."""
    meta = read_model_dir(path)
    if (meta.model, meta.head) != (model, head):
        raise TnflowError(
            f"--init-from {path} is a {meta.model} with the {meta.head} head; this run trains a {model} with "
            f"the {head} head. Use the same --model and --head, or start from --weights"
        )
    if list(meta.class_names) != list(class_names):
        theirs, ours = set(meta.class_names), set(class_names)
        diff = sorted(ours - theirs) or sorted(theirs - ours) or ["(same classes, another order)"]
        raise TnflowError(
            f"--init-from {path} was trained on other classes than this dataset's (differs in: "
            f"{', '.join(diff[:5])}); start from --weights imagenet instead"
        )
    check_checkpoint(Path(path) / CHECKPOINT)  # before the run waits for the GPU, not after
