"""fasdiff-jax: FaSDiff face compression with a Stable Diffusion prior, in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned where drift breaks numerics or file formats; ranges elsewhere.
INSTALL_REQUIRES = [
    "jax>=0.8,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "clu>=0.0.12",
    "grain>=0.2.12",
    "array-record>=0.7",
    "tensorflow-datasets>=4.9.8",
    "tensorflow-cpu>=2.20",
    "tensorboard>=2.20",
    "numpy>=2.0",
    "ml-dtypes>=0.5",
    "pillow>=10",
    "constriction==0.5.0",
    "absl-py",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.6",
    "hypothesis>=6.100",
    # The diffusers reference for parity tests; torch from the CPU build on local disk.
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers>=4.50",
    "safetensors>=0.4",
    "scikit-image>=0.24",
    "matplotlib>=3.8",
    "chex>=0.1.90",
]

setup(
    name="fasdiff-jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["fasdiff_jax", "fasdiff_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
