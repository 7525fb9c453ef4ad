"""Import CompressAI in benchmarks/.venv-compressai despite a broken torchvision.

The local torch 2.13.0 wheel is the CPU build, while PyPI's torchvision 0.28.0 is built
against CUDA torch (its ``_C.so`` needs ``libc10_cuda.so``), so ``import torchvision`` raises
RuntimeError. CompressAI 1.2.8 imports torchvision only to list its image transforms in a
registry (``compressai/registry/transforms.py``); the entropy models and codecs we measure
never use it. If the real torchvision cannot be imported we register an empty
``torchvision.transforms`` module so that registry gets no torchvision entries.
"""

import sys
import types


def import_compressai():
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure of the CUDA-built extension
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tv.transforms
    import compressai

    return compressai
