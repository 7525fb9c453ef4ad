"""Flax modules: SD UNet/VAE/ControlNet, entropy models, FaSDiff compressor."""
