"""Stable Diffusion networks in Flax linen (NHWC), numerically equal to diffusers'."""
