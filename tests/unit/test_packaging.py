"""What ships: a wheel built from the repository carries the schemas and data files the code
reads, and neither it nor the container image carries the benchmarks or the tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("worker", "producer_tools", "schemas")  # the packages the image installs and runs
NOT_SHIPPED = ("bench", "tests")


def test_wheel_ships_schemas_and_tokenizer_corpus_but_no_benchmarks_or_tests(tmp_path) -> None:
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
    assert {"producer_tools/web/static/index.html", "producer_tools/web/static/app.js"} <= names
    top_level = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert top_level == set(SHIPPED), top_level
    assert not any(n.startswith(tuple(f"{p}/" for p in NOT_SHIPPED)) for n in names)


def test_image_copies_only_what_runs() -> None:
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        if match := re.match(r"\s*COPY\s+(?!--from)(.+)", line):
            *sources, _dest = match.group(1).split()
            copied.update(s.rstrip("/") for s in sources)
    assert {"worker", "schemas"} <= copied, copied  # the demo (producer_tools) stays out
    assert not copied & {".", "bench", "tests"}, copied


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_nothing_shipped_imports_the_benchmarks_or_the_tests() -> None:
    offenders = []
    for package in SHIPPED:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            bad = _imported_modules(path) & set(NOT_SHIPPED)
            if bad:
                offenders.append(f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders
