"""TF: the only package that imports TensorFlow or tensornets.

Starting TensorFlow quietly (`startup`), the model graph and its data-parallel towers
(`graph`), one replica of the network (`network`), its input pipeline
(`inputs`), sessions and devices (`sessions`), the accuracy levers as graph ops, the
serving decode graph, the export converters, the tensornets compatibility shim, and a model
directory's files, its checkpoint and model.json (`model_files`). Everything outside this room stays fast to
import and test without TensorFlow.

May import: tasks.core, tasks.config, tasks.store, tasks.sources, tasks.cache.
"""
