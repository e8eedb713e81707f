"""Targets: what the checks ask of the implementation under test, and adapters that make targets of models."""
