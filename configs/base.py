"""Fields shared by every fasdiff-jax config: mesh, sharding rules, seed.

Not run on its own; other configs start from ``get_config()`` here and override fields.
"""

import ml_collections

from fasdiff_jax import sharding


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
