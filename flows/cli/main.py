"""`tnflow`: parse options into the run configuration, call a flow, print where the result is.

Options are made from the configuration's fields (`tasks.config.options`), so their names, types,
choices, defaults and help cannot drift from what the flows and deployments take. The last
line of standard output is always the result's absolute path, so scripts can use
`path=$(tnflow prepare ... | tail -n 1)`. Errors are one line on standard error with a
non-zero exit: 2 for bad options, 1 for a failed run; `--debug` adds the traceback. A flow
command gets a Prefect API for exactly as long as it runs (`tasks.core.prefect_server`), and
SIGTERM or Ctrl-C end it within seconds with one line (`tasks.core.processes`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tnflow.flows.cli import offline
from tnflow.flows.cli.arguments import add_config_options
from tnflow.tasks.config.options import DataConfig, RunConfig
from tnflow.tasks.config.sweeps import SweepConfig, plan_trials
from tnflow.tasks.core.errors import ConfigError, TnflowError
from tnflow.tasks.core.files import ensure_writable_dir, is_disk_full


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The installed distribution's version (a checkout that is not installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tnflow")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tnflow", description="Transfer learning on CIFAR or your image folders as a Prefect pipeline."
    )
    parser.add_argument("--version", action="version", version=f"tnflow {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prepare = commands.add_parser(
        "prepare",
        help="download a dataset and build its resized HDF5 cache",
        description="Download a CIFAR archive (or read your image folder, --data-dir), verify it, and resize it "
        "into one HDF5 file (train/valid/test). Prints the file's path last.",
    )
    add_config_options(prepare, DataConfig)
    prepare.set_defaults(handler=_prepare)

    run = commands.add_parser(
        "run",
        help="run the whole pipeline: data, weights, training, test, champion, report",
        description="Fine-tune an ImageNet-pretrained network (VGG19 by default; see `tnflow models`) on CIFAR "
        "(the recipe's defaults, its defects fixed) "
        "or on your images (--data-dir). "
        "Prints the run directory last; it holds model/, metrics.json, report.html and report.md.",
    )
    add_config_options(run, RunConfig)
    run.set_defaults(handler=_run)

    sweep = commands.add_parser(
        "sweep",
        help="train a trial per set of options, keep the best by validation accuracy",
        description="Run a trial (a whole run, without promotion) for every combination of --grid, or for --random "
        "N draws, at most --parallel at once: as subflows here, or as flow runs of --deployment on its work "
        "pool. The winner is the best by validation accuracy; only it goes through the champion gate. Every "
        "other option is a run option all trials share. Prints the sweep directory (leaderboard, report) last.",
    )
    add_config_options(sweep, SweepConfig)
    sweep.set_defaults(handler=_sweep)

    predict = commands.add_parser(
        "predict",
        help="top-3 classes for your own images, or a folder of them into a CSV",
        description="Classify images (PNG, JPEG, any size and mode) with a saved model: "
        "a run's model/ directory, or `champion` for <output dir>/champion. Folders are read recursively.",
    )
    predict.add_argument(
        "model", metavar="MODEL_DIR_OR_CHAMPION", help="a run's model/ directory, or `champion` (the latest promoted)"
    )
    predict.add_argument(
        "images", metavar="IMAGE_OR_DIR", nargs="+", help="image files, or folders of them (scored recursively)"
    )
    predict.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    predict.add_argument(
        "--out",
        metavar="CSV",
        help="write path, class, probability, margin, entropy, top3 and error per file to this CSV instead of "
        "printing (files that cannot be read get a row with the error, and the command exits 1)",
    )
    predict.add_argument("--batch-size", type=int, default=32, metavar="N", help="images scored at once (default: 32)")
    _champion_option(predict)
    predict.set_defaults(handler=offline.predict)

    export = commands.add_parser(
        "export",
        help="export a saved model as a SavedModel, ONNX or TFLite (preprocessing inside)",
        description="Write exports into a model directory (a run's model/, or `champion`), each checked against "
        "the SavedModel, and refresh its model card. (`tnflow run --export` makes them for every run.)",
    )
    export.add_argument(
        "model", metavar="MODEL_DIR_OR_CHAMPION", help="a run's model/ directory, or `champion` (the latest promoted)"
    )
    export.add_argument(
        "--format",
        default="savedmodel",
        metavar="FORMATS",
        help="comma-separated: savedmodel, onnx, tflite, tflite-float16 (default: savedmodel)",
    )
    export.add_argument("--float16", action="store_true", help="TFLite with float16 weights (half the size)")
    _champion_option(export)
    export.set_defaults(handler=offline.export)

    serve = commands.add_parser(
        "serve",
        help="serve the deployments of deployments/prefect.yaml (schedules included) from this process",
        description="Register the deployments defined in deployments/prefect.yaml and run their flow runs "
        "(scheduled or triggered with `prefect deployment run`) until interrupted. No work pool needed.",
    )
    serve.add_argument("--prefect-file", metavar="FILE", help="deployments file (default: deployments/prefect.yaml)")
    serve.set_defaults(handler=_serve)

    gc = commands.add_parser(
        "gc",
        help="remove versions of folder caches that no run or champion refers to",
        description="Each version of an image folder keeps its cache file. This removes those that no run "
        "directory or champion names and that are not the latest of their folder.",
    )
    gc.add_argument("--cache-dir", metavar="DIR", help="(default: $TNFLOW_CACHE_DIR or ~/.cache/tnflow)")
    gc.add_argument("--output-dir", metavar="DIR", help="runs and champions (default: $TNFLOW_OUTPUT_DIR or ./runs)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    gc.set_defaults(handler=offline.gc)

    models = commands.add_parser(
        "models",
        help="list the backbones --model takes",
        description="Every backbone with its default image size, parameters (1000-class network), ImageNet "
        "top-1 (tensornets' table), preprocessing and how its pretrained file is checked.",
    )
    models.set_defaults(handler=offline.models)

    for command in (prepare, run, sweep, predict, export, serve, gc, models):
        command.add_argument(
            "--debug", action="store_true", help="show tracebacks and Prefect's full logs for user errors too"
        )
    return parser


def _champion_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--output-dir", metavar="DIR", help="where `champion` is looked up (default: $TNFLOW_OUTPUT_DIR or ./runs)"
    )


def _values(args: argparse.Namespace, model: type[DataConfig]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in model.model_fields}


def _with_prefect(args: argparse.Namespace, call: Callable[[], Any]) -> Any:
    """Run a flow once its options are valid: a Prefect API for exactly as long, and a watch on it."""
    from tnflow.tasks.core.prefect_server import prefect_api, watch

    with prefect_api() as url, watch(url, args.stop):
        return call()


def _prepare(args: argparse.Namespace) -> str:
    config = DataConfig.from_values(_values(args, DataConfig))
    ensure_writable_dir(config.cache_dir)
    from tnflow.flows.prepare import prepare_data  # imports Prefect's engine: only once options are valid

    return _with_prefect(args, lambda: prepare_data(**config.model_dump()))


def _run(args: argparse.Namespace) -> str:
    config = RunConfig.from_values(_values(args, RunConfig))
    ensure_writable_dir(config.cache_dir)
    ensure_writable_dir(config.output_dir, option="--output-dir")
    from tnflow.flows.train import transfer_learning

    return _with_prefect(args, lambda: transfer_learning(**config.model_dump()).run_dir)


def _sweep(args: argparse.Namespace) -> str:
    config = SweepConfig.from_values(_values(args, SweepConfig))
    plan_trials(config)  # every trial's options checked before anything starts
    from tnflow.tasks.sweeps.search import check_search

    check_search(config)  # and, for --search optuna, Optuna and its storage
    ensure_writable_dir(config.cache_dir)
    ensure_writable_dir(config.output_dir, option="--output-dir")
    from tnflow.flows.sweep import sweep

    # The options as given: each trial derives its defaults (image size, head) from its own options.
    return _with_prefect(args, lambda: sweep(**config.model_dump(include=config.model_fields_set)))


def _serve(args: argparse.Namespace) -> None:
    from tnflow.flows.cli.serve import PREFECT_FILE, serve_deployments

    _with_prefect(args, lambda: serve_deployments(args.prefect_file or PREFECT_FILE))


NEEDS_TENSORFLOW = ("run", "sweep", "predict", "export", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in NEEDS_TENSORFLOW and (args.debug or args.command in ("predict", "export")):
        from tnflow.tasks.tf.startup import start_tensorflow

        # --debug: nothing hidden, a fatal CUDA/cuDNN error at start-up stays visible. predict and
        # export import TensorFlow on their way to the model (run's stages start it themselves):
        # started here, its start-up lines are hidden for them as for run.
        start_tensorflow(verbose=args.debug)
    from tnflow.flows.cli.console import disk_full_line, interrupted_line, user_errors_in_one_line
    from tnflow.tasks.core.processes import Interrupted, say_last, stop_on_signals

    with user_errors_in_one_line(enabled=not args.debug):
        try:
            with stop_on_signals(lambda stopped: interrupted_line(args.command, stopped)) as stop:
                args.stop = stop
                result = args.handler(args)
        except Interrupted as stopped:
            say_last(interrupted_line(args.command, stopped))  # once, if a second signal's hard exit said it first
            return stopped.code
        except TnflowError as exc:
            if args.debug:
                raise
            print(f"tnflow {args.command}: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ConfigError) else 1
        except Exception as exc:  # a full disk that no stage turned into its one line
            if args.debug or not is_disk_full(exc):
                raise
            print(disk_full_line(args.command, exc), file=sys.stderr)
            return 1
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
