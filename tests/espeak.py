"""espeak-ng for the tests that synthesise speech: without it they skip on a developer machine
and fail under CI (env CI set), where ``make system-deps`` installs it and a skip would hide a gap.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing under CI: make system-deps installs it")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
