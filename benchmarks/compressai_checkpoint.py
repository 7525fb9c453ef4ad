"""A checkpoint written by CompressAI itself, converted and coded by us: same files, same images?

Run from the main venv:  python benchmarks/compressai_checkpoint.py [--steps 300]
It runs itself under benchmarks/.venv-compressai (CompressAI 1.2.8 pins numpy<2) to train
CompressAI's ``MeanScaleHyperprior(128, 192)`` briefly on random crops of the three 256x256
faces of ``entropy_coding.py`` (rate + 0.01 * 255^2 * MSE, its aux loss too), save it the way
CompressAI's ``examples/train.py`` does (``{"epoch", "state_dict", "optimizer", ...}`` in a
``.pth.tar``) and compress/decompress the faces with CompressAI. Then, here:
``python -m fasdiff_jax.convert --compressai_checkpoint`` on that file, and our codec on the
same faces: file bytes and PSNR side by side, and how far our decoded pixels are from
CompressAI's. Writes benchmarks/compressai_checkpoint.json; see benchmarks/RESULTS.md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VENV_PY = HERE / ".venv-compressai" / "bin" / "python"


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def compressai_side(work: Path, steps: int):
    import torch

    sys.path.insert(0, str(HERE))
    from _compressai_import import import_compressai

    import_compressai()
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(0)
    faces = torch.from_numpy(np.load(work / "faces.npz")["faces"]).permute(0, 3, 1, 2).float() / 255
    net = MeanScaleHyperprior(128, 192)
    params = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    opt, aux_opt = torch.optim.Adam(params, 1e-4), torch.optim.Adam(aux, 1e-3)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(faces), 4)
        r, c = rng.integers(0, 128, 2)
        x = faces[idx][:, :, r:r + 128, c:c + 128]
        out = net(x)
        bpp = sum(-torch.log2(v).sum() for v in out["likelihoods"].values()) / (4 * 128 * 128)
        loss = bpp + 0.01 * 255**2 * torch.mean((out["x_hat"] - x) ** 2)
        opt.zero_grad(), aux_opt.zero_grad()
        loss.backward()
        net.aux_loss().backward()
        opt.step(), aux_opt.step()
    train_s = time.perf_counter() - t0
    net.update(force=True)
    net.eval()
    torch.save({"epoch": steps, "state_dict": net.state_dict(), "loss": loss.item(),
                "optimizer": opt.state_dict(), "aux_optimizer": aux_opt.state_dict()},
               work / "checkpoint.pth.tar")
    rows, decoded = [], []
    with torch.no_grad():
        for x in faces:
            enc = net.compress(x[None])
            dec = net.decompress(enc["strings"], enc["shape"])["x_hat"]
            img = (dec[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            decoded.append(img)
            rows.append({"payload_bytes": sum(len(s[0]) for s in enc["strings"])})
    np.savez(work / "compressai_decoded.npz", decoded=np.stack(decoded))
    (work / "compressai.json").write_text(json.dumps({"rows": rows, "train_s": train_s,
                                                      "final_loss": loss.item()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--compressai-python", default=str(VENV_PY))
    ap.add_argument("--out", default=str(HERE / "compressai_checkpoint.json"))
    ap.add_argument("--compressai", default=None, help=argparse.SUPPRESS)  # the subprocess' folder
    a = ap.parse_args()
    if a.compressai:
        return compressai_side(Path(a.compressai), a.steps)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from entropy_coding import faces

    from fasdiff_jax import convert
    from fasdiff_jax.coding import container
    from fasdiff_jax.models import hyperprior as H

    work = Path(tempfile.mkdtemp())
    imgs = faces()
    np.savez(work / "faces.npz", faces=np.stack(imgs))  # the CompressAI venv has no scikit-image
    r = subprocess.run([a.compressai_python, __file__, "--compressai", str(work), "--steps", str(a.steps)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    ref = json.loads((work / "compressai.json").read_text())
    ref_dec = np.load(work / "compressai_decoded.npz")["decoded"]
    if convert.main(["--compressai_checkpoint", str(work / "checkpoint.pth.tar"), "--out", str(work / "mbt")]):
        sys.exit("conversion failed")
    model, params = H.load_model(str(work / "mbt"))
    rows = []
    for img, theirs, row in zip(imgs, ref_dec, ref["rows"]):
        data = H.compress(model, params, img)
        ours = H.decompress(model, params, data)
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        rows.append({"ours_file_bytes": len(data),
                     "ours_payload_bytes": len(data) - container.header_bytes(1),
                     "compressai_payload_bytes": row["payload_bytes"],
                     "ours_psnr": psnr(img, ours), "compressai_psnr": psnr(img, theirs),
                     "psnr_ours_vs_compressai_decode": psnr(theirs, ours),
                     "decoded_mean_abs_diff": float(diff.mean()),
                     "decoded_max_abs_diff": int(diff.max()),
                     "decoded_pixels_over_2_levels_pct": float(100 * np.mean(diff > 2)),
                     "decoded_pixels_differing_pct": float(100 * np.mean(diff > 0))})
    result = {"steps": a.steps, "compressai_train_s": ref["train_s"], "final_loss": ref["final_loss"],
              "checkpoint_bytes": (work / "checkpoint.pth.tar").stat().st_size, "images": rows}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print("| face | payload bytes ours / CompressAI | PSNR dB ours / CompressAI | ours vs CompressAI "
          "decode: PSNR dB, mean / max abs diff, % pixels differing, % > 2 levels |")
    print("|---|---|---|---|")
    for i, x in enumerate(rows):
        print(f"| {i} | {x['ours_payload_bytes']} / {x['compressai_payload_bytes']} | "
              f"{x['ours_psnr']:.2f} / {x['compressai_psnr']:.2f} | "
              f"{x['psnr_ours_vs_compressai_decode']:.1f}, {x['decoded_mean_abs_diff']:.2f} / "
              f"{x['decoded_max_abs_diff']}, {x['decoded_pixels_differing_pct']:.1f}%, "
              f"{x['decoded_pixels_over_2_levels_pct']:.1f}% |")


if __name__ == "__main__":
    main()
