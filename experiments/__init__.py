"""Hydra entry point, sweeps and benchmarks."""
