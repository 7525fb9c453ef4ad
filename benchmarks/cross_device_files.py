"""Files written on one backend decode to the same symbols on another (CPU <-> GPU).

The tests prove decodability across device counts, batch sizes and jit on the CPU; this
script is the check for a real accelerator, which CI has not got:

    python benchmarks/cross_device_files.py run DIR       # on the CPU machine
    python benchmarks/cross_device_files.py run DIR       # on the GPU machine, same DIR
    python benchmarks/cross_device_files.py run DIR       # on the CPU again (decodes GPU files)
    python benchmarks/cross_device_files.py compare DIR   # exit 1 on any symbol mismatch

``run`` makes DIR/params.npz (N=128, M=192, seeded random init, on first use only), compresses
the test images on JAX's default backend into DIR/<key>_<name>.fsd, key = backend-precision,
then decodes every .fsd in DIR and records per file the sha256 of the decoded symbols (y_hat)
and the pixels in DIR/<key>_decoded.json. ``--precision default`` is what a user gets (TF32
convolutions on recent NVIDIA GPUs), ``highest`` is float32 throughout. ``compare`` requires
identical symbols for each file under every key and reports how far the pixels (float g_s)
differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images() -> dict[str, np.ndarray]:
    from skimage import data

    from entropy_coding import faces  # this folder: the benchmark's 256x256 face crops

    astronaut, _, chelsea = faces()
    return {"astronaut": astronaut, "chelsea": chelsea,
            "coffee_odd_size": data.coffee()[:203, :317], "camera_gray": data.camera()[:150, :190]}


def _model_params(d: Path):
    import jax
    import jax.numpy as jnp

    from fasdiff_jax.models import hyperprior as H

    model = H.MeanScaleHyperprior(N=128, M=192)
    path = d / "params.npz"
    if not path.exists():
        p = H.init_params(model, jax.random.PRNGKey(0))
        flat, _ = jax.tree_util.tree_flatten_with_path(p)
        np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    ref = jax.eval_shape(lambda r: H.init_params(model, r), jax.random.PRNGKey(0))
    npz = np.load(path)
    leaves, tree = jax.tree_util.tree_flatten_with_path(ref)
    return model, jax.tree_util.tree_unflatten(tree, [jnp.asarray(npz[jax.tree_util.keystr(k)]) for k, _ in leaves])


def run(d: Path, precision: str) -> None:
    import jax

    from fasdiff_jax.models import hyperprior as H

    if precision != "default":
        jax.config.update("jax_default_matmul_precision", precision)
    d.mkdir(parents=True, exist_ok=True)
    backend = f"{jax.default_backend()}-{precision}"
    model, params = _model_params(d)
    for name, img in _images().items():
        (d / f"{backend}_{name}.fsd").write_bytes(H.compress(model, params, img))
    out, pixels = {"backend": backend, "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "files": {}}, {}
    for f in sorted(d.glob("*.fsd")):
        data = f.read_bytes()
        _, y_hat = H.decode_file_latents(model, params, data)
        img = H.decompress(model, params, data)
        pixels[f.stem] = img
        out["files"][f.name] = {"bytes": len(data),
                                "y_hat_sha256": hashlib.sha256(y_hat.astype("<f8").tobytes()).hexdigest(),
                                "image_sha256": hashlib.sha256(img.tobytes()).hexdigest()}
    (d / f"{backend}_decoded.json").write_text(json.dumps(out, indent=1))
    np.savez_compressed(d / f"{backend}_decoded_pixels.npz", **pixels)
    print(json.dumps(out, indent=1))


def compare(d: Path) -> int:
    runs = {p.name.split("_")[0]: json.loads(p.read_text()) for p in sorted(d.glob("*_decoded.json"))}
    pix = {b: np.load(d / f"{b}_decoded_pixels.npz") for b in runs}
    bad = 0
    names = sorted(set().union(*(r["files"] for r in runs.values())))
    for name in names:
        got = {b: r["files"].get(name) for b, r in runs.items()}
        shas = {g["y_hat_sha256"] for g in got.values() if g}
        missing = [b for b, g in got.items() if g is None]
        stem = name[:-4]
        imgs = [pix[b][stem].astype(int) for b in runs if stem in pix[b]]
        dmax = max(int(np.abs(a - imgs[0]).max()) for a in imgs)
        frac = max(float(np.mean(a != imgs[0])) for a in imgs)
        ok = len(shas) == 1 and not missing
        bad += not ok
        print(f"{name}: {'same symbols' if ok else 'MISMATCH'} on {sorted(b for b, g in got.items() if g)}"
              f"{' (not decoded on ' + str(missing) + ')' if missing else ''}; "
              f"pixels max |diff| {dmax}, {100 * frac:.2f}% differ")
    print({b: f"{r['device']}, jax {r['jax']}" for b, r in runs.items()})
    return int(bad > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["run", "compare"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--precision", choices=["default", "highest"], default="default")
    a = ap.parse_args()
    if a.action == "run":
        run(a.dir, a.precision)
        return 0
    return compare(a.dir)


if __name__ == "__main__":
    sys.exit(main())
