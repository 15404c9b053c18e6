"""The benchmarks' tests use the engine tests' tiny models and one-thread fixtures."""

from tests.unit.engine.conftest import one_torch_thread, tiny_models

__all__ = ["one_torch_thread", "tiny_models"]
