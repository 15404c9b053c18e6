"""A wheel built from the repository carries the schemas and data files the code reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_schemas_and_tokenizer_corpus(tmp_path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("callscribe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for schema in sorted((REPO_ROOT / "schemas").glob("*.avsc")):
        assert f"schemas/{schema.name}" in names
    assert "worker/engine/tokenizer_corpus.txt" in names
    assert "worker/service/loop.py" in names
    assert "producer_tools/conversation.py" in names
    assert not any(n.startswith("tests/") for n in names)
