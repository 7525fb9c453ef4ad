"""Noise schedules and samplers."""
