"""Likelihood parity with CompressAI 1.2.8's EntropyBottleneck and GaussianConditional.

Run from the main venv:  python benchmarks/compressai_parity.py
Result (2026-11, CompressAI 1.2.8, torch 2.13.0 CPU): see benchmarks/RESULTS.md.
It computes our likelihoods (JAX, float32 and the host float64 path) for random parameters
and inputs, then runs itself under benchmarks/.venv-compressai (CompressAI pins numpy<2) with
``--compressai FILE`` to evaluate CompressAI on the same parameters and inputs, and reports
the maximum differences (written to benchmarks/compressai_parity.json).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VENV_PY = HERE / ".venv-compressai" / "bin" / "python"


def compressai_side(path):
    import torch

    sys.path.insert(0, str(HERE))
    from _compressai_import import import_compressai

    import_compressai()
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional

    d = np.load(path)
    c = int(d["channels"])
    eb = EntropyBottleneck(c, filters=(3, 3, 3, 3))
    with torch.no_grad():
        # CompressAI 1.2.8 keeps them in ParameterLists (matrices / biases / factors)
        n = len(eb.filters) + 1
        for kind, plist, count in (("matrix", eb.matrices, n), ("bias", eb.biases, n),
                                   ("factor", eb.factors, n - 1)):
            assert len(plist) == count, (kind, len(plist))
            for i in range(count):
                src = torch.from_numpy(d[f"eb_{kind}_{i}"].astype(np.float32))
                assert plist[i].shape == src.shape, (kind, i, plist[i].shape, src.shape)
                plist[i].copy_(src)
        v = torch.from_numpy(d["z"].astype(np.float32))  # (C, 1, K)
        out = eb._likelihood(v)
        lik = out[0] if isinstance(out, tuple) else out
        lik = eb.likelihood_lower_bound(lik).numpy()
        gc = GaussianConditional(None)
        g = gc._likelihood(torch.from_numpy(d["y"].astype(np.float32)),
                           torch.from_numpy(d["s"].astype(np.float32)),
                           torch.from_numpy(d["mu"].astype(np.float32)))
        g = gc.likelihood_lower_bound(g).numpy()
    np.savez(path + ".out.npz", eb=lik, gc=g)


def main():
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, str(HERE.parent))
    from fasdiff_jax.models import entropy as E

    c = 16
    m = E.EntropyBottleneck(c)
    v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, c)), "round")
    v = jax.tree_util.tree_map(lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(1), a.shape), v)
    p = {k: np.asarray(a) for k, a in v["params"].items()}
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (1, 8, 8, c)).astype(np.float32)
    z = np.round(z)
    _, ours_eb = m.apply(v, jnp.asarray(z), "round")
    ours_eb = np.asarray(ours_eb)
    ours_eb64 = E.bottleneck_likelihood_np(p, z, m.num_layers)
    y = rng.normal(0, 5, 4096).astype(np.float32)
    mu = rng.normal(0, 2, 4096).astype(np.float32)
    s = np.abs(rng.normal(0, 3, 4096)).astype(np.float32)
    y = np.round(y - mu) + mu
    _, ours_gc = E.GaussianConditional().apply({}, jnp.asarray(y), jnp.asarray(mu), jnp.asarray(s), "round")
    ours_gc = np.asarray(ours_gc)
    with tempfile.TemporaryDirectory() as td:
        f = os.path.join(td, "in.npz")
        kw = {f"eb_{k.split('_')[0]}_{k.split('_')[1]}": a for k, a in p.items()}
        np.savez(f, channels=c, z=z.reshape(-1, c).T[:, None, :], y=y, mu=mu, s=s, **kw)
        r = subprocess.run([str(VENV_PY), __file__, "--compressai", f], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        ref = np.load(f + ".out.npz")
    ref_eb = ref["eb"][:, 0, :].T.reshape(z.shape)
    res = {
        "entropy_bottleneck_max_abs_diff_jax_f32": float(np.abs(ref_eb - ours_eb).max()),
        "entropy_bottleneck_max_rel_diff_jax_f32": float((np.abs(ref_eb - ours_eb) / ref_eb).max()),
        "entropy_bottleneck_max_abs_diff_host_f64": float(np.abs(ref_eb - ours_eb64).max()),
        "entropy_bottleneck_bits_ours_vs_compressai": [float(-np.log2(ours_eb).sum()), float(-np.log2(ref_eb).sum())],
        # where they differ in relative terms (far tails), which one is right? float64 decides
        "entropy_bottleneck_max_rel_err_vs_f64_ours_jax_f32": float((np.abs(ours_eb - ours_eb64) / ours_eb64).max()),
        "entropy_bottleneck_max_rel_err_vs_f64_compressai": float((np.abs(ref_eb - ours_eb64) / ours_eb64).max()),
        "entropy_bottleneck_bits_f64": float(-np.log2(ours_eb64).sum()),
        "gaussian_conditional_max_abs_diff_jax_f32": float(np.abs(ref["gc"] - ours_gc).max()),
        "gaussian_conditional_max_rel_diff_jax_f32": float((np.abs(ref["gc"] - ours_gc) / ref["gc"]).max()),
        "gaussian_bits_ours_vs_compressai": [float(-np.log2(ours_gc).sum()), float(-np.log2(ref["gc"]).sum())],
        "n_elements": [int(z.size), int(y.size)],
    }
    (HERE / "compressai_parity.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--compressai":
        compressai_side(sys.argv[2])
    else:
        main()
