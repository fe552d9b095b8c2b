"""Flower ClientApp and everything clients do: the task, local training."""
