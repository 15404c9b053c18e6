"""Score one call's transcript against its references: WER, cpWER and DER.

The hypothesis is the call's FINAL segments (partials are drafts), read from the transcript topic
with a ``read_committed`` consumer (``read_topic``) or from a JSON dump of events such as
``tail --json`` writes (``read_dump``); both give ``TranscriptEvent`` records to
``hypothesis_from_events``.

* **WER** ignores speakers: every reference turn's words in start order against every final's
  words in start order (meeteval's SISO WER).
* **cpWER** (concatenated minimum-permutation WER, the CHiME-6 / multi-talker standard): each
  speaker's words concatenated, reference and hypothesis speakers paired to minimise the errors
  (meeteval). Speaker mistakes cost words here, which is why it is the number to watch for a
  speaker-attributed transcript.
* **DER** (pyannote.metrics): missed speech + false alarm + speaker confusion over the reference's
  speech time, speakers paired optimally, from the reference RTTM (or the transcript's turns) and
  the finals' times. ``collar_s`` is pyannote's: that much time centred on each reference boundary
  is not scored (NIST md-eval's ``-c 0.25`` is ``collar_s=0.5``).

Words are compared lowercased without punctuation (``normalize_words``) unless told otherwise.
meeteval and pyannote.metrics are imported on first use (the ``tools`` extra installs them).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from producer_tools.reference import Reference, SpeakerTurn
from schemas import EventKind, TranscriptEvent, WireFormat

_WORD: Final = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SESSION: Final = "call"  # meeteval groups segments by session; one call is one session


class ScoreError(ValueError):
    """The transcript or the references cannot be scored; the message says which and why."""


# --- reading the hypothesis --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """A call's FINAL segments in start order, and whether its STREAM_END was seen."""

    stream_id: str
    turns: tuple[SpeakerTurn, ...]
    ended: bool
    unfinished_segments: int = 0  # segments with partials but no final: not scored

    @property
    def speakers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.speaker for t in self.turns))


def hypothesis_from_events(
    events: Iterable[TranscriptEvent], stream_id: str | None = None
) -> Hypothesis:
    """The finals of ``stream_id`` (or of the only stream in ``events``); the last final of a
    segment wins, so a dump holding a replay scores the same."""
    events = list(events)
    streams = list(dict.fromkeys(e.stream_id for e in events))
    if stream_id is None:
        if not streams:
            raise ScoreError("no transcript events to score")
        if len(streams) > 1:
            raise ScoreError(
                f"events of {len(streams)} calls ({', '.join(streams[:5])}"
                f"{', …' if len(streams) > 5 else ''}): say which one to score"
            )
        stream_id = streams[0]
    elif stream_id not in streams:
        raise ScoreError(f"no events of stream {stream_id!r}")
    finals: dict[int, SpeakerTurn] = {}
    drafted: set[int] = set()
    ended = False
    for e in events:
        if e.stream_id != stream_id:
            continue
        if e.kind is EventKind.FINAL:
            finals[e.segment_index] = SpeakerTurn(e.speaker or "?", e.start_s, e.end_s, e.text)
        elif e.kind is EventKind.PARTIAL:
            drafted.add(e.segment_index)
        elif e.kind is EventKind.STREAM_END:
            ended = True
    turns = sorted(finals.values(), key=lambda t: (t.start_s, t.end_s))
    return Hypothesis(stream_id, tuple(turns), ended, len(drafted - finals.keys()))


def read_dump(source: str | Path | TextIO) -> list[TranscriptEvent]:
    """Events from JSON lines (``tail --json``) or one JSON array of event objects."""
    name = getattr(source, "name", str(source))
    if isinstance(source, str | Path):
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ScoreError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ScoreError(f"{source}: cannot read: {exc}") from None
    else:
        text = source.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScoreError(f"{name}: not a JSON array: {exc}") from None
        numbered: Iterable[tuple[str, object]] = (
            (f"{name}: item {i}", item) for i, item in enumerate(items)
        )
    else:
        numbered = _json_lines(name, text)
    return [_event(where, item) for where, item in numbered]


def _json_lines(name: str, text: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScoreError(f"{where}: not JSON: {exc}") from None


def _event(where: str, item: object) -> TranscriptEvent:
    if not isinstance(item, dict):
        raise ScoreError(f"{where}: expected a TranscriptEvent object, got {type(item).__name__}")
    try:
        return TranscriptEvent.from_avro(item)
    except KeyError as exc:
        raise ScoreError(f"{where}: not a TranscriptEvent: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ScoreError(f"{where}: not a TranscriptEvent: {exc}") from None


def read_topic(
    bootstrap_servers: str,
    topic: str,
    stream_id: str,
    *,
    timeout_s: float = 60.0,
    schema_registry_url: str = "",
    wire_format: WireFormat = WireFormat.PLAIN,
    progress: TextIO | None = None,
    progress_sec: float = 5.0,
) -> list[TranscriptEvent]:
    """The committed events of ``stream_id`` from the start of ``topic`` to its STREAM_END.

    Fails if no event comes for ``timeout_s`` before the end: a call still being transcribed
    past that, a wrong stream id, or no worker running.
    """
    from producer_tools.tail import follow

    events: list[TranscriptEvent] = []
    shown = time.monotonic()
    for event in follow(
        bootstrap_servers,
        topic,
        stream_id=stream_id,
        from_beginning=True,
        stop_at_stream_end=True,
        idle_timeout_sec=timeout_s,
        schema_registry_url=schema_registry_url,
        wire_format=wire_format,
    ):
        events.append(event)
        if progress is not None and time.monotonic() - shown >= progress_sec:
            shown = time.monotonic()
            finals = sum(e.kind is EventKind.FINAL for e in events)
            print(
                f"{stream_id}: {len(events)} events, {finals} finals, up to {event.end_s:.1f} s",
                file=progress,
                flush=True,
            )
    if not events or events[-1].kind is not EventKind.STREAM_END:
        seen = f"{len(events)} event(s) and no STREAM_END" if events else "no event"
        raise ScoreError(
            f"{topic}: {seen} for stream {stream_id!r} after waiting {timeout_s:g} s; "
            "is the stream id right and a worker running?"
        )
    return events


# --- metrics -----------------------------------------------------------------------------------


def normalize_words(text: str) -> list[str]:
    """Lowercase words without punctuation; apostrophes inside words stay (``don't``)."""
    return _WORD.findall(text.replace("’", "'").lower())


def _words(text: str, normalize: bool) -> str:
    return " ".join(normalize_words(text) if normalize else text.split())


@dataclass(frozen=True, slots=True)
class WordErrors:
    """Word errors against a reference of ``length`` words."""

    error_rate: float
    errors: int
    length: int
    substitutions: int
    deletions: int
    insertions: int


@dataclass(frozen=True, slots=True)
class SpeakerWordErrors:
    """cpWER: word errors after pairing speakers; ``assignment`` maps reference → hypothesis."""

    error_rate: float
    errors: int
    length: int
    substitutions: int
    deletions: int
    insertions: int
    assignment: dict[str, str | None] = field(default_factory=dict)
    missed_speakers: int = 0
    false_alarm_speakers: int = 0


@dataclass(frozen=True, slots=True)
class DiarizationErrors:
    """DER and its parts, in seconds of speech (overlapped speech counts once per speaker)."""

    error_rate: float
    missed_s: float
    false_alarm_s: float
    confusion_s: float
    total_s: float
    collar_s: float
    mapping: dict[str, str] = field(default_factory=dict)  # hypothesis → reference speaker


def word_error_rate(
    reference: Sequence[SpeakerTurn], hypothesis: Sequence[SpeakerTurn], normalize: bool = True
) -> WordErrors:
    """Speaker-blind WER of all words in start order."""
    from meeteval.wer import siso_word_error_rate

    ref = " ".join(_words(t.text, normalize) for t in _by_start(reference)).split()
    hyp = " ".join(_words(t.text, normalize) for t in _by_start(hypothesis)).split()
    _need_words(ref)
    er = siso_word_error_rate(" ".join(ref), " ".join(hyp))
    return WordErrors(
        er.error_rate, er.errors, er.length, er.substitutions, er.deletions, er.insertions
    )


def cp_word_error_rate(
    reference: Sequence[SpeakerTurn], hypothesis: Sequence[SpeakerTurn], normalize: bool = True
) -> SpeakerWordErrors:
    """cpWER: per-speaker word streams, speakers paired to minimise the errors."""
    from meeteval.io import SegLST
    from meeteval.wer import cp_word_error_rate as meeteval_cpwer

    def seglst(turns: Sequence[SpeakerTurn]) -> SegLST:
        return SegLST(
            [
                {
                    "session_id": _SESSION,
                    "speaker": t.speaker,
                    "start_time": t.start_s,
                    "end_time": t.end_s,
                    "words": _words(t.text, normalize),
                }
                for t in turns
            ]
        )

    _need_words([w for t in reference for w in _words(t.text, normalize).split()])
    er = meeteval_cpwer(seglst(reference), seglst(hypothesis))
    assignment = {ref: hyp for ref, hyp in er.assignment if ref is not None}
    return SpeakerWordErrors(
        er.error_rate,
        er.errors,
        er.length,
        er.substitutions,
        er.deletions,
        er.insertions,
        assignment,
        er.missed_speaker,
        er.falarm_speaker,
    )


def diarization_error_rate(
    reference: Sequence[SpeakerTurn], hypothesis: Sequence[SpeakerTurn], collar_s: float = 0.0
) -> DiarizationErrors:
    """DER over [0, the latest end of either side], speakers paired optimally."""
    if collar_s < 0 or not math.isfinite(collar_s):
        raise ScoreError(f"collar must be 0 s or more, got {collar_s}")
    import warnings

    with warnings.catch_warnings():  # pyannote warns about its optional plotting backends
        warnings.simplefilter("ignore")
        from pyannote.core import Annotation, Segment, Timeline
        from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns: Sequence[SpeakerTurn]) -> Annotation:
        result = Annotation(uri=_SESSION)
        for i, t in enumerate(turns):
            if t.end_s > t.start_s:  # pyannote ignores empty segments anyway: say so here
                result[Segment(t.start_s, t.end_s), i] = t.speaker
        return result

    ref, hyp = annotation(reference), annotation(hypothesis)
    if not ref:
        raise ScoreError("the reference has no speech to score diarization against")
    end = max(t.end_s for t in (*reference, *hypothesis))
    metric = DiarizationErrorRate(collar=collar_s, skip_overlap=False)
    uem = Timeline([Segment(0.0, end)], uri=_SESSION)
    parts = metric(ref, hyp, uem=uem, detailed=True)
    total = parts["total"]
    if total <= 0:
        raise ScoreError(f"no reference speech is left outside a {collar_s:g} s collar")
    mapping = metric.optimal_mapping(ref, hyp, uem=uem) if hyp else {}
    return DiarizationErrors(
        error_rate=parts["diarization error rate"],
        missed_s=parts["missed detection"],
        false_alarm_s=parts["false alarm"],
        confusion_s=parts["confusion"],
        total_s=total,
        collar_s=collar_s,
        mapping={str(h): str(r) for h, r in mapping.items()},
    )


def _by_start(turns: Sequence[SpeakerTurn]) -> list[SpeakerTurn]:
    return sorted(turns, key=lambda t: (t.start_s, t.end_s))


def _need_words(words: Sequence[str]) -> None:
    if not words:
        raise ScoreError("the reference transcript has no words: WER is undefined")


# --- the report --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScoreReport:
    """Every score of one call; a metric is None when its reference was not given."""

    stream_id: str
    recording: str
    reference_turns: int
    reference_speakers: int
    hypothesis_finals: int
    hypothesis_speakers: int
    stream_ended: bool
    unfinished_segments: int
    normalized: bool
    wer: WordErrors | None = None
    cpwer: SpeakerWordErrors | None = None
    der: DiarizationErrors | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A few aligned lines a person reads."""
        lines = [
            f"stream     {self.stream_id}: {self.hypothesis_finals} final segment(s), "
            f"{self.hypothesis_speakers} speaker(s)"
            + ("" if self.stream_ended else " (no STREAM_END: the call may be cut short)"),
            f"reference  {self.recording}: {self.reference_turns} turn(s), "
            f"{self.reference_speakers} speaker(s)",
            "",
            f"{'metric':<7} {'rate':>8} {'errors':>9} {'of':>9}  detail",
        ]
        if self.wer is not None:
            w = self.wer
            lines.append(
                f"{'WER':<7} {_pct(w.error_rate)} {w.errors:>9} {w.length:>9}  {_word_detail(w)}"
            )
        if self.cpwer is not None:
            c = self.cpwer
            pairs = ", ".join(f"{r}→{h or '∅'}" for r, h in c.assignment.items())
            lines.append(
                f"{'cpWER':<7} {_pct(c.error_rate)} {c.errors:>9} {c.length:>9}  "
                f"{_word_detail(c)}; speakers {pairs}"
            )
        if self.der is not None:
            d = self.der
            errors = d.missed_s + d.false_alarm_s + d.confusion_s
            lines.append(
                f"{'DER':<7} {_pct(d.error_rate)} {errors:>8.2f}s {d.total_s:>8.2f}s  "
                f"missed {d.missed_s:.2f} s, false alarm {d.false_alarm_s:.2f} s, "
                f"confusion {d.confusion_s:.2f} s (collar {d.collar_s:g} s)"
            )
        if self.unfinished_segments:
            lines.append(f"({self.unfinished_segments} segment(s) had partials only: not scored)")
        if not self.normalized:
            lines.append("(words compared as written: case and punctuation count)")
        return "\n".join(lines)


def _pct(rate: float) -> str:
    return f"{100 * rate:>7.1f}%"


def _word_detail(w: WordErrors | SpeakerWordErrors) -> str:
    return f"sub {w.substitutions}, del {w.deletions}, ins {w.insertions}"


def score(
    hypothesis: Hypothesis,
    transcript: Reference | None = None,
    rttm: Reference | None = None,
    *,
    collar_s: float = 0.0,
    normalize: bool = True,
) -> ScoreReport:
    """WER and cpWER against ``transcript``; DER against ``rttm``, else ``transcript``'s turns."""
    speech = rttm if rttm is not None else transcript
    if speech is None:
        raise ScoreError("nothing to score against: give a reference transcript or an RTTM")
    words = transcript.turns if transcript is not None else ()
    return ScoreReport(
        stream_id=hypothesis.stream_id,
        recording=speech.recording,
        reference_turns=len(speech.turns),
        reference_speakers=len(speech.speakers),
        hypothesis_finals=len(hypothesis.turns),
        hypothesis_speakers=len(hypothesis.speakers),
        stream_ended=hypothesis.ended,
        unfinished_segments=hypothesis.unfinished_segments,
        normalized=normalize,
        wer=word_error_rate(words, hypothesis.turns, normalize) if transcript else None,
        cpwer=cp_word_error_rate(words, hypothesis.turns, normalize) if transcript else None,
        der=diarization_error_rate(speech.turns, hypothesis.turns, collar_s),
    )


def write_report(report: ScoreReport, out: TextIO = sys.stdout, as_json: bool = False) -> None:
    out.write((json.dumps(report.to_json()) if as_json else report.table()) + "\n")
    out.flush()
