"""bench.report and the ``python -m bench`` dispatcher."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.__main__ import main


def test_table_pads_and_right_aligns_and_refuses_ragged_rows() -> None:
    text = report.table(["calls", "ms"], [["1", "12.5"], ["1024", "3"]])
    assert text.splitlines() == [
        "| calls |   ms |",
        "|------:|-----:|",
        "|     1 | 12.5 |",
        "|  1024 |    3 |",
    ]
    with pytest.raises(ValueError, match="2 cells"):
        report.table(["a", "b", "c"], [["1", "2"]])


def test_write_json_adds_the_environment_and_refuses_nan(tmp_path) -> None:
    path = tmp_path / "out" / "r.json"
    report.write_json(path, {"results": [{"calls": 4}]})
    doc = json.loads(path.read_text())
    assert doc["results"] == [{"calls": 4}]
    assert {"machine", "versions", "load_avg", "utc"} <= set(doc["environment"])
    assert "Python" in doc["environment"]["versions"]
    with pytest.raises(ValueError):
        report.write_json(path, {"x": float("nan")})


def test_append_markdown_keeps_what_is_there(tmp_path) -> None:
    path = tmp_path / "B.md"
    report.append_markdown(path, "## one\n")
    report.append_markdown(path, "## two")
    assert path.read_text() == "# Benchmarks\n\n## one\n\n## two\n"


def test_dispatcher_names_the_benchmarks(capsys) -> None:
    assert main([]) == 2
    assert "engine" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "loop" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["engine", "--help"])
    assert exc.value.code == 0
    assert "python -m bench engine" in capsys.readouterr().out
