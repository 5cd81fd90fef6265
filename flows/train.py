"""transfer_learning: source -> cache -> weights -> train -> validate -> export -> promote -> report."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tnflow.flows.prepare import cached_data
from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.core.gpu_slot import gpu_slot
from tnflow.tasks.release.export import export_task
from tnflow.tasks.release.promote import promote_task, starting_model_task
from tnflow.tasks.release.report import report_task, run_directory
from tnflow.tasks.training.train import CODE as TRAINING_CODE
from tnflow.tasks.training.train import train_task
from tnflow.tasks.training.validate import validate_task
from tnflow.tasks.training.weights import fetch_weights_task
from tnflow.tasks.training.workdir import work_dir_for


@flow(name="transfer-learning")
@flow_parameters(RunConfig)
def transfer_learning(config: RunConfig) -> str:
    """Fine-tune an ImageNet-pretrained model on CIFAR or your image folder; returns the run directory."""
    run_dir = run_directory(config.output_dir, flow_run.name)

    cache = cached_data(config)
    classes = list(cache.class_names)
    spec, settings = config.model_spec(len(classes)), config.train_settings()
    start = None
    if config.init_from:
        start = starting_model_task(config.init_from, config.output_dir, cache.path, spec.model, spec.head, classes)
    if start is not None:
        start_dir, weights_path, weights_id = start[0], None, f"model:{start[1]}"
        origin = {"source": f"the trained model {start[0]}", "md5": None, "check": "same backbone, head and classes"}
    else:
        weights = fetch_weights_task(config.weights, config.weights_md5, config.model, config.head, config.cache_dir)
        start_dir, weights_path, weights_id = None, weights.path, weights.md5
        origin = {"source": weights.source, "md5": weights.md5, "check": weights.check}
    work_dir = work_dir_for(config.output_dir, cache.path, weights_id, spec, settings, TRAINING_CODE)
    with gpu_slot(config.gpu_slot, get_run_logger()):  # runs sharing a GPU take turns
        trained = train_task(
            cache.path,
            weights_path,
            spec,
            settings,
            str(work_dir),
            classes,
            config.eval_batch_size,
            config.retrain,
            start_dir,
        )
        test = validate_task(trained.model_dir, cache.path, "test", config.eval_batch_size, run_dir)
    # Exported before the gate: a promotion then links the whole directory, exports and card
    # included, into the new champion before it switches over, so the champion's exports are
    # never from another model than its checkpoint.
    model_dir = export_task(trained.model_dir, run_dir, cache.path, config.export_formats, origin)
    promotion = promote_task(
        model_dir,
        run_dir,
        test["test_accuracy"],
        cache.path,
        config.output_dir,
        config.promote_margin,
        config.promotes,
        config.eval_batch_size,
    )
    report_task(
        run_dir,
        model_dir,
        cache.path,
        {**config.model_dump(), "weights_check": origin["check"]},
        list(trained.history),
        trained.device,
        promotion,
    )
    return run_dir
