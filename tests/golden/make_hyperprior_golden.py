"""Writes the hyperprior golden files ONCE (do not re-run unless the format version changes).

python tests/golden/make_hyperprior_golden.py
"""

import hashlib
import json
import sys
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

from fasdiff_jax.models import hyperprior as H  # noqa: E402
from skimage import data as skdata  # noqa: E402

model = H.MeanScaleHyperprior(N=8, M=12, num_scales=64)
params = H.init_params(model, jax.random.PRNGKey(0), (64, 64))
leaves = jax.tree_util.tree_flatten_with_path(params)[0]
np.savez(HERE / "hyperprior_tiny_params.npz",
         **{jax.tree_util.keystr(p): np.asarray(v, np.float32) for p, v in leaves})

import test_hyperprior as T  # noqa: E402

model, params = T._load_golden()
img = skdata.astronaut()[100:170, 180:225]
data = H.compress(model, params, img)
(HERE / "hyperprior_tiny.fsd").write_bytes(data)
sha, _ = T._yhat_sha(model, params, data)
dec = H.decompress(model, params, data)
np.save(HERE / "hyperprior_tiny_decoded.npy", dec)
(HERE / "hyperprior_tiny.json").write_text(json.dumps(
    {"y_hat_sha256": sha, "shape": list(dec.shape),
     "image_sha256": hashlib.sha256(dec.tobytes()).hexdigest(), "bytes": len(data)}, indent=1))
print(len(data), sha)
