"""The commands that run no flow: predict, export, gc and models work on saved models and files directly.

No Prefect server is started for them; each returns what `tnflow` prints last (or None) and
raises `TnflowError` for the one-line error `flows.cli.main` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from tnflow.tasks.config.datasets import default_cache_dir, default_output_dir
from tnflow.tasks.core.errors import ConfigError, TnflowError


def predict(args: argparse.Namespace) -> str | None:
    from tnflow.tasks.release.predict import files_to_score, model_directory, predict_files, score_folder

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer of at least 1, got {args.batch_size}")
    model_dir = model_directory(args.model, args.output_dir or default_output_dir())
    if args.out:
        scores = score_folder(model_dir, args.images, args.out, args.batch_size, empty_ok=False)
        counts, written = scores.counts, str(scores.csv)
        summary = ", ".join(f"{name} {n}" for name, n in counts.most_common())
        print(f"{sum(counts.values())} files scored: {summary or 'none'}", file=sys.stderr)
        if scores.to_label:
            print(f"the least confident, to label next: {scores.to_label}", file=sys.stderr)
        if scores.drifted:
            print(f"they do not look like the model's test split: {', '.join(scores.drifted)}", file=sys.stderr)
        if unreadable := counts.get("(unreadable)", 0):  # as without --out: a file not scored fails the command
            print(written)  # the CSV is complete all the same: the last line of output still names it
            raise TnflowError(
                f"{unreadable} of {sum(counts.values())} files could not be read: the error column of {written} "
                "says why"
            )
        return written
    paths = files_to_score(args.images, missing_ok=True)  # a missing file is reported with the unreadable ones
    failed, results = 0, []
    with contextlib.closing(predict_files(model_dir, paths, batch_size=args.batch_size)) as predicted:
        for result in predicted:
            failed += "error" in result
            if args.json:
                results.append(result)
            elif "error" in result:
                print(f"tnflow predict: error: {result['error']}", file=sys.stderr)
            else:
                top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
                print(f"{result['image']}: {top}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    if failed:
        raise TnflowError(f"{failed} of {len(paths)} images could not be read (see above)")
    return None


def export(args: argparse.Namespace) -> str:
    from tnflow.tasks.config.checks import export_formats

    try:
        formats = export_formats(args.format)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("--export", "--format")) from None
    if args.float16:
        formats = tuple("tflite-float16" if f == "tflite" else f for f in formats)
    from tnflow.tasks.release.export import describe, export_into_model_dir
    from tnflow.tasks.release.predict import model_directory

    model_dir = model_directory(args.model, args.output_dir or default_output_dir())
    for fmt, check in export_into_model_dir(model_dir, formats).items():
        print(describe(fmt, check, model_dir), file=sys.stderr)
    return str(model_dir)


def gc(args: argparse.Namespace) -> str:
    from tnflow.tasks.cache.gc import collect

    cache_dir = Path(args.cache_dir or default_cache_dir())
    if not cache_dir.is_dir():
        raise ConfigError(f"--cache-dir {cache_dir} is not a directory")
    removed = collect(cache_dir, args.output_dir or default_output_dir(), dry_run=args.dry_run)
    for path, _ in removed:
        print(path)
    verb = "would remove" if args.dry_run else "removed"
    return f"{verb} {len(removed)} cache file(s), {sum(size for _, size in removed) / 1e6:.1f} MB"


def models(args: argparse.Namespace) -> None:
    from tnflow.tasks.config.backbones import BACKBONES

    rows = [("model", "size", "params", "top-1", "heads", "input", "file", "weights check")]
    for b in BACKBONES.values():
        heads = "gap, full" if b.full_head else "gap"
        size = f"{b.image_size} (min {b.min_size})"
        file = "Keras .h5" if b.weights_format == "keras" else "tensornets .npz"
        rows.append(
            (b.name, size, f"{b.params / 1e6:.1f}M", f"{b.top1:.1f}%", heads, b.preprocessing, file, b.weights_check)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
