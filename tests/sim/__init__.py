"""Deterministic simulation of the worker's surroundings (see ``tests/sim/kafka.py``)."""
