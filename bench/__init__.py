"""Benchmarks of the worker, kept out of the shipped package (``python -m bench --help``).

``bench.engine`` measures the streaming engine on random-weight models, ``bench.loop`` the Kafka
loop with a pass-through engine; ``bench.report`` is what their reports share. Nothing under
``worker/``, ``producer_tools/`` or ``schemas/`` may import this package: the container image
does not ship it (tests/unit/test_packaging.py holds that).
"""
