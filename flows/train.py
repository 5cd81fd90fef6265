"""transfer_learning: source, cache, start, train, validate, (cross-fit,) review, export, gate, report (MLflow)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tnflow.tasks.cache.stage import build_cache_task
from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.core.gpu_slot import gpu_count, gpu_slot
from tnflow.tasks.core.progress import quiet_hook_lines, run_logger
from tnflow.tasks.release.export import export_task
from tnflow.tasks.release.promote import promote_task
from tnflow.tasks.release.report import RunSummary, report_task
from tnflow.tasks.release.review import review_task
from tnflow.tasks.release.tracking import close_run_task, end_failed_run, open_run_task
from tnflow.tasks.sources.download import source_task
from tnflow.tasks.store.in_use import reading
from tnflow.tasks.store.layout import new_run_dir
from tnflow.tasks.tf.startup import visible_gpus
from tnflow.tasks.training.cross_fit import cross_fit_task
from tnflow.tasks.training.starting_point import starting_point_task
from tnflow.tasks.training.train import train_task
from tnflow.tasks.training.validate import validate_task


# The return value is persisted (as JSON, in Prefect's result storage): a sweep reads its trials' from their flow runs.
@flow(
    name="transfer-learning",
    persist_result=True,
    result_serializer="json",
    on_failure=[end_failed_run],  # its MLflow run, if any, ends FAILED
    on_crashed=[end_failed_run],
)
@flow_parameters(RunConfig)
def transfer_learning(config: RunConfig) -> RunSummary:
    """Fine-tune an ImageNet-pretrained model on CIFAR or your image folder; returns its figures and where it is."""
    quiet_hook_lines()
    run_dir = new_run_dir(config.output_dir, flow_run.name)
    tracked = (  # an MLflow run, when asked (--mlflow-uri, $MLFLOW_TRACKING_URI)
        open_run_task(
            tracking=config.tracking(), name=flow_run.name, flow_run_id=flow_run.id, params=config.model_dump()
        )
        if config.mlflow_uri
        else None
    )
    source = source_task(
        folder=config.data_dir, url=config.source_url, dest_dir=config.cache_dir, md5=config.source_md5
    )
    cache = build_cache_task(
        source=source.path,
        source_md5=source.md5,
        spec=config.cache_spec(),
        cache_dir=config.cache_dir,
        dask_address=config.dask_address,
        origin=config.data_url,
    )
    with reading(config.output_dir, run_dir, cache.path):  # `tnflow gc` keeps it until the report names it
        start = starting_point_task(
            init_from=config.init_from,
            weights=config.weights,
            weights_md5=config.weights_md5,
            model=config.model,
            head=config.head,
            cache_path=cache.path,
            class_names=list(cache.class_names),
            output_dir=config.output_dir,
            cache_dir=config.cache_dir,
        )
        gpus = visible_gpus()
        towers = gpu_count(config.gpus, len(gpus))
        with gpu_slot(config.gpu_slot, run_logger(), gpus=gpus, count=towers) as held:  # GPUs of its own, or turns
            trained = train_task(
                cache_path=cache.path,
                start=start,
                spec=config.model_spec(len(cache.class_names)),
                settings=config.train_settings(),
                output_dir=config.output_dir,
                class_names=list(cache.class_names),
                eval_batch_size=config.eval_batch_size,
                retrain=config.retrain,
                gpus=held,
                towers=towers,
                trial=config.trial_report(),  # a sweep's Optuna trial, whose pruner may stop it
            )
            test = validate_task(
                model_dir=trained.model_dir,
                cache_path=cache.path,
                split="test",
                batch_size=config.eval_batch_size,
                out_dir=run_dir,
                gpus=held,
            )
            out_of_fold = (  # --review-train K: the training split scored by K models that did not see it
                cross_fit_task(
                    cache_path=cache.path,
                    start=start,
                    spec=config.model_spec(len(cache.class_names)),
                    settings=config.train_settings(),
                    folds=config.review_train,
                    output_dir=config.output_dir,
                    run_dir=run_dir,
                    class_names=list(cache.class_names),
                    eval_batch_size=config.eval_batch_size,
                    gpus=held,
                    towers=towers,
                )
                if config.review_train
                else None
            )
            review = review_task(
                model_dir=trained.model_dir,
                cache_path=cache.path,
                run_dir=run_dir,
                batch_size=config.eval_batch_size,
                test=test,
                out_of_fold=out_of_fold,
            )
        # Exported before the gate: a promotion then links the whole directory, exports and card
        # included, into the new champion before it switches over, so the champion's exports are
        # never from another model than its checkpoint.
        model_dir = export_task(
            model_dir=trained.model_dir,
            run_dir=run_dir,
            cache_path=cache.path,
            formats=config.export_formats,
            start=start,
            test=test,
        )
        promotion = promote_task(
            model_dir=model_dir,
            run_dir=run_dir,
            test_accuracy=test.accuracy,
            test_predictions=test.predictions["test"],
            cache_path=cache.path,
            output_dir=config.output_dir,
            gate=config.gate_settings(),
            eval_batch_size=config.eval_batch_size,
        )
        summary = report_task(
            run_dir=run_dir,
            model_dir=model_dir,
            cache_path=cache.path,
            config=config.model_dump(),
            start=start,
            trained=trained,
            test=test,
            promotion=promotion,
            review=review,
        )
        if tracked:
            close_run_task(
                tracking=config.tracking(), run_id=tracked, summary=summary, history=trained.history, decision=promotion
            )
        return summary
