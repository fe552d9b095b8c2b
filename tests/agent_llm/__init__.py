"""Tests of ``agent_strategy.llm``.

A package, so that its ``conftest`` is imported as ``llm.conftest`` and does not replace
the top-level ``conftest`` module that other test modules import helpers from.
"""
