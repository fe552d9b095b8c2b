"""Flower ServerApp, the agent strategy, aggregation math and results."""
