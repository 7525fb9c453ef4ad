"""Fields shared by every fasdiff-jax config: mesh, sharding rules, seed.

Not run on its own; other configs start from ``get_config()`` here and override fields.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from fasdiff_jax import sharding
from fasdiff_jax.data.pipeline import DataConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Parallelism is configuration: mesh axis sizes (-1 = all remaining devices) and the
    # logical-axis -> mesh-axis rules every module's annotations go through.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.logical_axis_rules = tuple(
        (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
        for name, axes in sharding.DEFAULT_LOGICAL_AXIS_RULES
    )
    # Precision, remat and attention are the model's: config.model.compute_dtype ("bfloat16"
    # on TPU/GPU), .remat, .attention_impl ("cudnn" on recent NVIDIA GPUs).
    return config


def data_config(**values) -> ml_collections.ConfigDict:
    """``config.data`` holding every field the pipeline reads (``DataConfig``), at its default
    unless ``values`` sets it, so that any of them can be overridden on the command line
    (``--config.data.num_workers=8``); a config that listed only some refused the others."""
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KeyError(f"DataConfig has no fields {unknown}; it has {sorted(fields)}")
    data = {}
    for name, f in fields.items():
        if name in values:
            data[name] = values[name]
        elif f.default is None:  # typed, so that an override is checked like any other
            data[name] = config_dict.placeholder(int if "int" in str(f.type) else str)
        else:
            data[name] = f.default
    return ml_collections.ConfigDict(data)
