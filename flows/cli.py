"""`tnflow`: parse options into a Config, call a flow, print where the result is.

The last line of standard output is always the result's absolute path, so scripts can use
`path=$(tnflow prepare ... | tail -n 1)`. Errors are one line on standard error with a
non-zero exit: 2 for bad options, 1 for a failed run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from tasks.config import DATASETS, HEADS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MODELS, Config
from tasks.errors import ConfigError, TnflowError
from tasks.files import ensure_writable_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(DATASETS), help=f"dataset to train on (default: {defaults.dataset})")
    data.add_argument(
        "--data-url", metavar="URL", help="archive URL, file:// URL or path (default: the dataset's official URL)"
    )
    data.add_argument("--data-md5", metavar="HEX", help="md5 of the archive (default: the official archive's md5)")
    data.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        help=f"resize images to SxS, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (default: {defaults.image_size})",
    )
    data.add_argument(
        "--valid-size",
        type=int,
        metavar="N",
        help=f"training images held out for validation (default: {defaults.valid_size})",
    )
    data.add_argument(
        "--limit-train", type=int, metavar="N", help="use a stratified subset of N training images (default: all)"
    )
    data.add_argument(
        "--limit-test", type=int, metavar="N", help="use a stratified subset of N test images (default: all)"
    )
    data.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"where downloads and caches live (default: $TNFLOW_CACHE_DIR or {defaults.cache_dir})",
    )
    data.add_argument("--seed", type=int, help=f"seed for splits and shuffling (default: {defaults.seed})")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    model = parser.add_argument_group("model and training")
    model.add_argument("--model", choices=MODELS, help=f"network to fine-tune (default: {defaults.model})")
    model.add_argument(
        "--weights",
        metavar="imagenet|none|PATH_OR_URL",
        help="pretrained weights: the published ImageNet file, none (random start), or a Keras .h5 "
        f"path/URL (default: {defaults.weights})",
    )
    model.add_argument("--weights-md5", metavar="HEX", help="md5 of the weights file (default: the published file's)")
    model.add_argument(
        "--head",
        choices=HEADS,
        help="full: all of VGG19 (224 only); gap: conv base + average pooling (default: full at 224, gap otherwise)",
    )
    model.add_argument("--epochs", type=int, metavar="N", help=f"training epochs (default: {defaults.epochs})")
    model.add_argument(
        "--batch-size", type=int, metavar="N", help=f"training batch size (default: {defaults.batch_size})"
    )
    model.add_argument(
        "--eval-batch-size", type=int, metavar="N", help=f"validation batch size (default: {defaults.eval_batch_size})"
    )
    model.add_argument(
        "--learning-rate", type=float, metavar="LR", help=f"Adam learning rate (default: {defaults.learning_rate:g})"
    )
    model.add_argument(
        "--mixed-precision", action="store_true", default=None, help="float16 compute on GPUs (default: off)"
    )
    model.add_argument("--xla", action="store_true", default=None, help="compile with XLA (default: off)")
    model.add_argument(
        "--output-dir", metavar="DIR", help="where runs are written (default: $TNFLOW_OUTPUT_DIR or ./runs)"
    )
    champion = parser.add_argument_group("champion")
    champion.add_argument(
        "--promote-margin",
        type=float,
        metavar="ACC",
        help="promote only if test accuracy beats the champion's by more than this (default: 0)",
    )
    champion.add_argument(
        "--no-promote", dest="promote", action="store_false", default=None, help="never replace the champion"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tnflow", description="Transfer learning on CIFAR as a Prefect pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prepare = commands.add_parser(
        "prepare",
        help="download a dataset and build its resized HDF5 cache",
        description="Download a CIFAR archive, verify it, and resize it into one HDF5 file "
        "(train/valid/test). Prints the file's path last.",
    )
    _add_data_options(prepare)
    prepare.set_defaults(handler=_prepare)
    run = commands.add_parser(
        "run",
        help="run the whole pipeline: data, weights, training, test, report",
        description="Fine-tune an ImageNet-pretrained VGG19 on CIFAR (the recipe's defaults, its defects fixed). "
        "Prints the run directory last; it holds model/, metrics.json, report.html and report.md.",
    )
    _add_data_options(run)
    _add_training_options(run)
    run.set_defaults(handler=_run)

    predict = commands.add_parser(
        "predict",
        help="top-3 classes for your own images",
        description="Classify PNG/JPEG images (any size; grey and RGBA converted) with a saved model: "
        "a run's model/ directory, or `champion` for <output dir>/champion.",
    )
    predict.add_argument("model", metavar="MODEL_DIR_OR_CHAMPION")
    predict.add_argument("images", metavar="IMAGE", nargs="+")
    predict.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    predict.add_argument(
        "--output-dir", metavar="DIR", help="where `champion` is looked up (default: $TNFLOW_OUTPUT_DIR or ./runs)"
    )
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve the deployments of deployments/prefect.yaml (schedules included) from this process",
        description="Register the deployments defined in deployments/prefect.yaml and run their flow runs "
        "(scheduled or triggered with `prefect deployment run`) until interrupted. No work pool needed.",
    )
    serve.add_argument("--prefect-file", metavar="FILE", help="deployments file (default: deployments/prefect.yaml)")
    serve.set_defaults(handler=_serve)
    return parser


def _config(args: argparse.Namespace) -> Config:
    fields = set(Config.__dataclass_fields__)
    return Config.from_dict({k: v for k, v in vars(args).items() if k in fields})


def _prepare(args: argparse.Namespace) -> str:
    config = _config(args)
    ensure_writable_dir(config.cache_dir)
    from flows.prepare import prepare_data  # imports Prefect's engine: only once options are valid

    return prepare_data(**_flow_params(prepare_data, config))


def _run(args: argparse.Namespace) -> str:
    config = _config(args)
    ensure_writable_dir(config.cache_dir)
    ensure_writable_dir(config.output_dir, option="--output-dir")
    from flows.train import transfer_learning

    return transfer_learning(**_flow_params(transfer_learning, config))


def _predict(args: argparse.Namespace) -> str | None:
    from tasks.model_dir import read_model_dir
    from tasks.predict import predict_files

    output_dir = Config.from_dict({"output_dir": args.output_dir}).output_dir
    model_dir = Path(output_dir) / "champion" if args.model == "champion" else Path(args.model)
    read_model_dir(model_dir)  # a clear error before TensorFlow starts
    results = predict_files(model_dir, args.images)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" in result:
                print(f"tnflow predict: error: {result['error']}", file=sys.stderr)
            else:
                top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
                print(f"{result['image']}: {top}")
    failed = sum("error" in r for r in results)
    if failed:
        raise TnflowError(f"{failed} of {len(results)} images could not be read (see above)")
    return None


def _serve(args: argparse.Namespace) -> None:
    from flows.serve import PREFECT_FILE, serve_deployments

    serve_deployments(args.prefect_file or PREFECT_FILE)


def _flow_params(flow: object, config: Config) -> dict[str, object]:
    """The validated values of the flow's own parameters."""
    return {name: getattr(config, name) for name in inspect.signature(flow.fn).parameters}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.handler(args)
    except ConfigError as exc:
        print(f"tnflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TnflowError as exc:
        print(f"tnflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
