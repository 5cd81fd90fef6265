"""The model card: what a model learnt from, how well it does, and how to load each export.

A team that receives `model.onnx` from a weekly retrain needs to know, without tnflow, which
data and backbone made it, how sure its test accuracy is, which classes it gets wrong, and
where it should not be used. The card's data lives in model.json (`card`), so it travels with
the model and can be rendered again (after `tnflow export` adds a format, or a promotion adds
to the champion history); `model_card.md` is that data as a page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tnflow.tasks.cache.contents import describe_cache
from tnflow.tasks.config.backbones import BACKBONES
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.release.significance import wilson_interval
from tnflow.tasks.tf.model_files import ModelRecord, read_model_dir, update_model_json

CARD = "model_card.md"


def card_data(
    meta: ModelRecord,
    metrics: dict[str, Any],
    cache_path: str | Path,
    data: dict[str, list[tuple]],
    weights: dict[str, Any],
) -> dict[str, Any]:
    """The card's facts, from the model, its test metrics, its cache and where its weights came from."""
    info = describe_cache(cache_path)
    source = {"dataset": info.dataset, "digest": info.source_md5, "lineage": info.lineage or None}
    backbone = BACKBONES[meta.model]
    total = int(metrics["num_test"])
    correct = round(metrics["test_accuracy"] * total)
    low, high = wilson_interval(correct, total)
    counts = {row[0]: {"train": row[1], "valid": row[2], "test": row[3]} for row in data["class_counts"]}
    return {
        "data": {
            **source,
            "source": dict(data["data"]).get("source", ""),
            "classes": list(meta.class_names),
            "images": counts.pop("all classes"),
            "images_per_class": counts,
            "skipped": [list(row) for row in data["skipped"] if row[0] != "none"],
        },
        "backbone": {
            "model": meta.model,
            "head": meta.head,
            "image_size": meta.image_size,
            "preprocessing": meta.preprocessing,
            "imagenet_top1": backbone.top1,
            "pretrained": weights,
        },
        "test": {
            "accuracy": metrics["test_accuracy"],
            "images": total,
            "ci95": [low, high],
            "per_class": dict(zip(metrics["class_names"], metrics["per_class_accuracy"], strict=True)),
        },
        "champion_history": [],
    }


def write_card(directory: str | Path) -> Path:
    """Render model_card.md from the directory's model.json (call again after anything changes)."""
    directory = Path(directory)
    meta = read_model_dir(directory)
    path = directory / CARD
    write_atomic(path, render(meta, directory))
    return path


def add_champion_history(directory: str | Path, history: list[dict[str, Any]]) -> None:
    """Record the champion line's decisions, this promotion last, in a champion's card."""
    meta = read_model_dir(directory)
    card = meta.card
    update_model_json(Path(directory), {"card": {**card, "champion_history": history}})
    write_card(directory)


def render(meta: ModelRecord, directory: Path) -> str:
    card = meta.card
    data, backbone, test = card.get("data", {}), card.get("backbone", {}), card.get("test", {})
    names = meta.class_names
    dataset = data.get("dataset", "?")
    if dataset == "folder" and data.get("source"):
        dataset = f"{Path(str(data['source'])).name} (a folder)"
    lines = [
        f"# Model card: {meta.model} on {dataset} ({len(names)} classes)",
        "",
        "## Intended use",
        "",
        f"Classifies a picture as one of: {', '.join(names)}. It was trained and tested on pictures like those "
        f"of its data below; for anything else (other classes, other kinds of pictures) its answer is one of "
        f"these classes all the same, with no reliable way to say 'none of them'.",
        "",
        "## Data",
        "",
        f"- source: {data.get('source') or '?'} (digest {data.get('digest') or '-'}"
        + (f", folder lineage {data['lineage']})" if data.get("lineage") else ")"),
        f"- images: {_split_counts(data.get('images', {}))}",
        f"- skipped files: {len(data.get('skipped', []))}"
        + (" (listed in the cache's manifest)" if data.get("skipped") else ""),
        "",
        "| class | train | valid | test | test accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    per_class = test.get("per_class", {})
    for name in names:
        count = data.get("images_per_class", {}).get(name, {})
        accuracy = per_class.get(name)
        lines.append(
            f"| {name} | {count.get('train', '?')} | {count.get('valid', '?')} | {count.get('test', '?')} | "
            f"{'?' if accuracy is None else f'{accuracy:.4f}'} |"
        )
    pretrained = backbone.get("pretrained", {})
    lines += [
        "",
        "## Model",
        "",
        f"- backbone: {meta.model}{_imagenet(backbone, pretrained)}, head {meta.head}, "
        f"input {meta.image_size}x{meta.image_size} RGB",
        f"- preprocessing (inside every export): {meta.preprocessing or '?'}",
        f"- started from: {_origin(pretrained)}",
        f"- test-time augmentation: {meta.tta}",
        f"- training: {_training(meta.training)}",
        f"- best epoch: {meta.epoch if meta.epoch is not None else '?'}",
        "",
        "## Performance",
        "",
    ]
    if test:
        low, high = test["ci95"]
        lines.append(
            f"- test accuracy **{test['accuracy']:.4f}** on {test['images']} images "
            f"(95% confidence interval {low:.4f} to {high:.4f}, Wilson)"
        )
        worst = sorted(per_class.items(), key=lambda item: item[1])[:3]
        lines.append(f"- weakest classes: {', '.join(f'{n} {a:.4f}' for n, a in worst)}")
    else:
        lines.append("- not measured")
    history = card.get("champion_history") or []
    lines += ["", "## Champion history", ""]
    if history:
        lines += [
            "| promoted at | run | test accuracy | replaced | its accuracy |",
            "| --- | --- | ---: | --- | ---: |",
        ]
        for record in history:
            replaced = record.get("replaced_accuracy")
            lines.append(
                f"| {record['promoted_at']} | {record['run_id']} | {record['test_accuracy']:.4f} | "
                f"{record.get('replaced_run_id') or '-'} | {'-' if replaced is None else f'{replaced:.4f}'} |"
            )
    else:
        lines.append("Not a champion (this card is of a run's model).")
    lines += [
        "",
        "## Known limits",
        "",
        "- Accuracy is measured on held-out pictures of the same source; pictures from elsewhere (other cameras, "
        "crops, lighting) may do worse. The interval above covers sampling only.",
        "- A picture is made square the way the training cache did it "
        f"({meta.resize}); `serving_bytes` decodes JPEG, PNG, GIF and BMP, ignores EXIF "
        "orientation (send upright pictures) and refuses pictures over the pixel limit.",
        "- float16 TFLite weights can change a close call between two classes.",
        "",
        "## Loading the exports",
        "",
    ]
    lines += _loading(meta, directory, card.get("exports", {}))
    return "\n".join(lines) + "\n"


def _imagenet(backbone: dict[str, Any], pretrained: dict[str, Any]) -> str:
    """The published weights' ImageNet accuracy, which says nothing of a model that did not start from them."""
    if pretrained.get("source") in (None, "none"):
        return ""
    return f" (ImageNet top-1 {backbone.get('imagenet_top1', '?')}% with its published weights)"


def _origin(pretrained: dict[str, Any]) -> str:
    if pretrained.get("source") in (None, "none"):
        return "random weights (--weights none)"
    text = str(pretrained["source"]) + (f" (md5 {pretrained['md5']})" if pretrained.get("md5") else "")
    return text + (f"; checked against {pretrained['check']}" if pretrained.get("check") not in (None, "none") else "")


def _split_counts(images: dict[str, int]) -> str:
    return ", ".join(f"{images[s]} {s}" for s in ("train", "valid", "test") if s in images) or "?"


def _training(training: dict[str, Any]) -> str:
    keys = ("epochs", "batch_size", "learning_rate", "optimizer", "augment", "label_smoothing", "lr_schedule")
    return ", ".join(f"{k} {training[k]}" for k in keys if k in training) or "?"


def _loading(meta: ModelRecord, directory: Path, exports: dict[str, Any]) -> list[str]:
    size = meta.image_size
    snippets = {
        "saved_model": (
            "TensorFlow (uint8 RGB (N, {s}, {s}, 3); or encoded files with `serving_bytes`)",
            [
                "import tensorflow as tf",
                "model = tf.saved_model.load('saved_model')",
                "out = model.signatures['serving_default'](images=tf.constant(images))  # out['top_class']",
            ],
        ),
        "model.onnx": (
            "ONNX Runtime (uint8 RGB (N, {s}, {s}, 3); class names in labels.txt)",
            [
                "import onnxruntime as ort",
                "session = ort.InferenceSession('model.onnx')",
                "probabilities = session.run(['probabilities'], {'images': images})[0]",
            ],
        ),
        "model.tflite": (
            "TFLite (uint8 RGB (N, {s}, {s}, 3); class names in labels.txt)",
            [
                "import tensorflow as tf",
                "runner = tf.lite.Interpreter('model.tflite').get_signature_runner()",
                "probabilities = runner(images=images)['probabilities']",
            ],
        ),
    }
    lines = []
    for file, (title, code) in snippets.items():
        present = sorted(p.name for p in directory.glob(f"{Path(file).stem}*{Path(file).suffix}") if p.exists())
        if not present:
            continue
        lines += [f"{title.format(s=size)}: {', '.join(present)}", "", "```python", *code, "```", ""]
    if not lines:
        lines = ["No exports yet: `tnflow export <this directory> --format savedmodel` makes one.", ""]
    differences = [
        f"{fmt} {check['max_difference']:.1e}" for fmt, check in exports.items() if "max_difference" in check
    ]
    if differences:
        lines.append(f"Largest probability difference from the SavedModel on probe images: {', '.join(differences)}.")
    return lines
