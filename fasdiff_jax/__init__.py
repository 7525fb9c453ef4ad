"""fasdiff-jax: FaSDiff face compression with a Stable Diffusion prior, in JAX/Flax."""

__version__ = "0.1.0"
