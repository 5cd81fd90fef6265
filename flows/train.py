"""transfer_learning: download -> cache -> fetch weights -> train -> validate -> promote -> report."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tasks.cache import cache_stage
from tasks.config import Config
from tasks.download import download_stage
from tasks.promote import promote_task
from tasks.report import report_task, run_directory
from tasks.train import train_stage, work_dir_for
from tasks.validate import validate_stage
from tasks.weights import weights_stage


@flow(name="transfer-learning")
def transfer_learning(
    dataset: str = "cifar10",
    data_url: str | None = None,
    data_md5: str | None = None,
    image_size: int = 224,
    valid_size: int = 5000,
    limit_train: int | None = None,
    limit_test: int | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    model: str = "vgg19",
    weights: str = "imagenet",
    weights_md5: str | None = None,
    head: str | None = None,
    epochs: int = 7,
    batch_size: int = 32,
    eval_batch_size: int = 256,
    learning_rate: float = 1e-5,
    mixed_precision: bool = False,
    xla: bool = False,
    output_dir: str | None = None,
    promote: bool = True,
    promote_margin: float = 0.0,
) -> str:
    """Fine-tune an ImageNet-pretrained model on CIFAR; returns the run directory."""
    config = Config.from_dict(locals())  # every parameter is a Config field, validated before any work
    run_dir = run_directory(config.output_dir, flow_run.name)

    archive = download_stage(config.source_url, config.cache_dir, config.source_md5)
    cache = cache_stage(archive.path, archive.md5, config.cache_spec(), config.cache_dir)
    pretrained = weights_stage(config.weights, config.weights_md5, config.model, config.head, config.cache_dir)
    spec, settings = config.model_spec(), config.train_settings()
    work_dir = work_dir_for(config.output_dir, cache.path, pretrained.md5, spec, settings)
    trained = train_stage(cache.path, pretrained.path, spec, settings, str(work_dir), list(cache.class_names))
    test = validate_stage(trained.model_dir, cache.path, "test", config.eval_batch_size, run_dir)
    promotion = promote_task(
        trained.model_dir,
        run_dir,
        test["test_accuracy"],
        cache.path,
        config.output_dir,
        config.promote_margin,
        config.promote,
    )
    report_task(
        run_dir, trained.model_dir, cache.path, config.as_dict(), list(trained.history), trained.device, promotion
    )
    return run_dir
