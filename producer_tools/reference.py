"""Reference files for scoring: a JSON transcript (who said what, when) and speaker turns as RTTM.

``synth`` writes both; ``score`` reads them. The JSON transcript is one object::

    {"recording": "call-7", "turns": [{"speaker": "A", "start": 0.25, "end": 2.1, "text": "…"}, …]}

with any other keys (how the audio was made) kept for people and ignored here. RTTM is NIST's
one-line-per-turn format: ``SPEAKER <recording> <channel> <start> <duration> <NA> <NA> <speaker>
<NA> <NA>``; only SPEAKER lines are read, times in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

TIME_DECIMALS: Final = 3  # both files keep times to the millisecond, so they agree exactly


class ReferenceError(ValueError):
    """A reference file is missing, malformed or inconsistent; the message names file and line."""


@dataclass(frozen=True, slots=True)
class SpeakerTurn:
    """One speaker's stretch of speech; ``text`` is empty where only times are known (RTTM)."""

    speaker: str
    start_s: float
    end_s: float
    text: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class Reference:
    """A recording's reference turns, in start order."""

    recording: str
    turns: tuple[SpeakerTurn, ...]

    @property
    def speakers(self) -> tuple[str, ...]:
        """Speakers in order of first appearance."""
        return tuple(dict.fromkeys(t.speaker for t in self.turns))


# --- JSON transcript ---------------------------------------------------------------------------


def write_transcript(
    path: str | Path, reference: Reference, extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``reference`` as the JSON transcript; ``extra`` keys go first (recipe, speakers)."""
    document = {
        **(extra or {}),
        "recording": reference.recording,
        "turns": [
            {
                "speaker": t.speaker,
                "start": round(t.start_s, TIME_DECIMALS),
                "end": round(t.end_s, TIME_DECIMALS),
                "text": t.text,
            }
            for t in reference.turns
        ],
    }
    Path(path).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def read_transcript(path: str | Path) -> Reference:
    """The JSON transcript at ``path``; a clear ``ReferenceError`` for anything malformed."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReferenceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ReferenceError(f"{path}: not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("turns"), list):
        raise ReferenceError(f'{path}: expected an object with a "turns" list')
    turns = [_turn(path, i, item) for i, item in enumerate(document["turns"])]
    recording = document.get("recording")
    return Reference(
        recording=str(recording) if recording else path.stem,
        turns=tuple(sorted(turns, key=lambda t: (t.start_s, t.end_s))),
    )


def _turn(path: Path, index: int, item: object) -> SpeakerTurn:
    where = f"{path}: turn {index}"
    if not isinstance(item, dict):
        raise ReferenceError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [k for k in ("speaker", "start", "end", "text") if k not in item]
    if missing:
        raise ReferenceError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(item["text"], str) or not str(item["speaker"]):
        raise ReferenceError(f"{where}: text must be a string and speaker non-empty")
    start, end = _seconds(where, item["start"]), _seconds(where, item["end"])
    _check_span(where, start, end)
    return SpeakerTurn(str(item["speaker"]), start, end, item["text"])


def _seconds(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReferenceError(f"{where}: times must be finite numbers of seconds, got {value!r}")
    return float(value)


def _check_span(where: str, start: float, end: float) -> None:
    if start < 0 or end < start:
        raise ReferenceError(f"{where}: needs 0 <= start <= end, got start {start}, end {end}")


# --- RTTM --------------------------------------------------------------------------------------


def write_rttm(path: str | Path, reference: Reference) -> None:
    """One SPEAKER line per turn, channel 1, times to the millisecond."""
    Path(path).write_text("".join(rttm_lines(reference)))


def rttm_lines(reference: Reference) -> Iterable[str]:
    for t in reference.turns:
        start = round(t.start_s, TIME_DECIMALS)
        duration = round(round(t.end_s, TIME_DECIMALS) - start, TIME_DECIMALS)
        yield (
            f"SPEAKER {reference.recording} 1 {start:.3f} {duration:.3f} "
            f"<NA> <NA> {t.speaker} <NA> <NA>\n"
        )


def read_rttm(path: str | Path, recording: str | None = None) -> Reference:
    """The SPEAKER turns of one recording in an RTTM file.

    With several recordings in the file, ``recording`` picks one (an error names them if not).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReferenceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceError(f"{path}: cannot read: {exc}") from None
    by_recording: dict[str, list[SpeakerTurn]] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith((";", "#")) or fields[0] != "SPEAKER":
            continue  # blank lines, comments and the other RTTM line types carry no turns
        where = f"{path}:{number}"
        if len(fields) < 8:
            raise ReferenceError(
                f"{where}: a SPEAKER line needs at least 8 fields "
                f"(SPEAKER file channel start duration <NA> <NA> speaker), got {len(fields)}"
            )
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise ReferenceError(
                f"{where}: start and duration must be numbers, got {fields[3]!r} {fields[4]!r}"
            ) from None
        if not (math.isfinite(start) and math.isfinite(duration)) or duration < 0:
            raise ReferenceError(f"{where}: bad start {start} or duration {duration}")
        _check_span(where, start, start + duration)
        by_recording.setdefault(fields[1], []).append(
            SpeakerTurn(fields[7], start, round(start + duration, 6))
        )
    if not by_recording:
        raise ReferenceError(f"{path}: no SPEAKER lines")
    if recording is None:
        if len(by_recording) > 1:
            raise ReferenceError(
                f"{path}: holds {len(by_recording)} recordings ({_names(by_recording)}); "
                "say which one"
            )
        recording = next(iter(by_recording))
    elif recording not in by_recording:
        raise ReferenceError(f"{path}: no recording {recording!r} (it has {_names(by_recording)})")
    turns = sorted(by_recording[recording], key=lambda t: (t.start_s, t.end_s))
    return Reference(recording, tuple(turns))


def _names(recordings: Sequence[str] | Mapping[str, object]) -> str:
    names = sorted(recordings)
    return ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
