"""The Colab demo notebook runs end to end (few steps): its code is the code users run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib
import pytest

from data_fixtures import embedded_dirs  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "fasdiff_tiny_demo.ipynb"


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).splitlines()
            cells.append("\n".join(ln for ln in lines if not ln.lstrip().startswith(("%", "!"))))
    return cells


# The notebook trains the program of test_train's scenario (tiny config, 8 devices): on the
# same worker, the session's compilation cache compiles it once for both.
@pytest.mark.xdist_group("train_scenario")
def test_notebook_trains_compresses_decompresses_and_evaluates(embedded_dirs, tmp_path,  # noqa: F811
                                                               monkeypatch):
    matplotlib.use("Agg")
    cache = Path(embedded_dirs["train"]).parents[1]  # <cache>/<dataset version>/train
    monkeypatch.setenv("FASDIFF_CACHE", str(cache))
    monkeypatch.setenv("FASDIFF_DEMO_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("FASDIFF_DEMO_STEPS", "3")
    monkeypatch.setenv("FASDIFF_DEMO_X0_EVERY", "1000")  # the x̂0 step is covered by test_fasdiff
    monkeypatch.setenv("FASDIFF_DEMO_EVAL_LIMIT", "3")  # the 3rd repeats the 2nd's photo key
    monkeypatch.chdir(ROOT)
    ns: dict = {"__name__": "__notebook__"}
    for i, src in enumerate(_code_cells(NOTEBOOK)):
        try:
            exec(compile(src, f"{NOTEBOOK.name}[cell {i}]", "exec"), ns)
        except Exception as e:  # name the cell: the notebook is what users run
            pytest.fail(f"notebook cell {i} raised {type(e).__name__}: {e}")
    assert ns["step"] == 3 and math.isfinite(ns["final_metrics"]["loss"])
    assert ns["recon"].shape == ns["face"].shape and ns["recon"].dtype.name == "uint8"
    assert len(ns["blob"]) > 66  # header + a real payload
    res = ns["report"]["results"]
    assert res["bpp"] > 0 and 0 <= res["lpips"] and -1 <= res["identity-cos"] <= 1
    assert len(ns["report"]["images"]) == len(ns["anchor"]["images"]) == 3
    assert ns["anchor"]["name"] == "jpeg-q10" and ns["anchor"]["results"]["bpp"] > 0
    assert ns["learned"]["name"] == "mbt2018-mean@15" and len(ns["learned"]["images"]) == 3
    assert ns["learned"]["results"]["bpp"] > 0 and math.isfinite(ns["mbt_metrics"]["loss"])
    assert os.path.isdir(tmp_path / "work" / "checkpoints")
