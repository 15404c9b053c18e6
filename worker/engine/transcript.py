"""Per-stream transcript assembly: new text per speaker → segments, revised, then final.

The segment rules are NeMo's (``MultiTalkerInstanceManager.ASRState.
update_sessionwise_seglsts_for_parallel`` in nemo_toolkit 3.0): a speaker's new text extends
that speaker's open segment unless it starts more than ``sent_break_sec`` after the segment's
end, in which case it opens a new segment (a leading punctuation mark still closes the old
one, and the new segment's first word is capitalised).

Unlike NeMo, which keeps every segment of the call until it ends, a segment is handed out as
FINAL and forgotten as soon as it can no longer change:

* the same speaker opened a new segment;
* nothing was added for ``final_after_silence_sec`` past the point where any new text would
  open a new segment (the one difference from NeMo: a punctuation mark that opens the
  speaker's next segment after that stays on the new segment);
* it reached ``max_segment_sec`` (a monologue is cut, so memory stays bounded);
* the stream ended.

So a stream holds at most one open segment per speaker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_LEADING_PUNCTUATION = (".", ",", "?", "!")


@dataclass(frozen=True, slots=True)
class WordTiming:
    """A word and its times, seconds from the start of the stream."""

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class SegmentUpdate:
    """One revision of a segment, as the engine hands it out."""

    segment_index: int
    revision: int
    final: bool
    speaker: str
    start_s: float
    end_s: float
    text: str
    words: tuple[WordTiming, ...]


@dataclass(slots=True)
class _Segment:
    index: int
    speaker: int
    start: float
    end: float
    text: str
    words: list[WordTiming] = field(default_factory=list)
    revision: int = -1
    changed: bool = True

    def update(self, final: bool) -> SegmentUpdate:
        self.revision += 1
        self.changed = False
        return SegmentUpdate(
            segment_index=self.index,
            revision=self.revision,
            final=final,
            speaker=f"speaker_{self.speaker}",
            start_s=self.start,
            end_s=self.end,
            text=self.text,
            words=tuple(self.words),
        )


@dataclass(frozen=True)
class AssemblerConfig:
    sent_break_sec: float = 1.0
    final_after_silence_sec: float = 2.0
    max_segment_sec: float = 60.0
    emit_partials: bool = True


class TranscriptAssembler:
    """Turns each step's new text per speaker into segment revisions; bounded per stream."""

    def __init__(self, config: AssemblerConfig) -> None:
        self._cfg = config
        self._open: dict[int, _Segment] = {}
        self._last_end: dict[int, float] = {}
        self._out: list[SegmentUpdate] = []
        self.segments_opened = 0

    def add_text(
        self,
        speaker: int,
        diff_text: str,
        start: float,
        end: float,
        words: list[WordTiming],
        continues_word: bool = False,
    ) -> None:
        """New text of one speaker from one step (NeMo's diff of its hypothesis text).

        ``words`` are the step's new words; ``continues_word`` says the first of them continues
        the speaker's previous word (a sub-word piece, or a punctuation mark).
        """
        last_end = self._last_end.get(speaker, 0.0)
        current = self._open.get(speaker)
        if current is None and last_end != 0.0 and start <= last_end + self._cfg.sent_break_sec:
            # NeMo would extend a segment we already finalised (after silence or at the length
            # cap); open a new one instead so finals stay final.
            last_end = 0.0
        if last_end == 0.0 or start > last_end + self._cfg.sent_break_sec:
            stripped = diff_text.strip()
            if current is not None:
                if stripped and stripped[0] in _LEADING_PUNCTUATION:
                    # The mark closes the old segment: its word piece goes along with it.
                    current.text = (current.text + stripped[0]).strip()
                    diff_text = stripped[1:]
                    if continues_word and words:
                        _extend_last_word(current, words[0])
                        words = words[1:]
                self._close(speaker)
            text = diff_text.lstrip()
            if text.strip():
                split = text.split()
                split[0] = split[0].capitalize()
                if words:
                    first = words[0]
                    words = [
                        WordTiming(first.text.capitalize(), first.start_s, first.end_s),
                        *words[1:],
                    ]
                segment = _Segment(
                    index=self.segments_opened,
                    speaker=speaker,
                    start=round(start, 3),
                    end=round(end, 3),
                    text=" ".join(split),
                    words=list(words),
                )
                self.segments_opened += 1
                self._open[speaker] = segment
                self._last_end[speaker] = segment.end
        else:
            assert current is not None
            current.end = end
            current.text = (current.text + diff_text).strip()
            if continues_word and words:
                _extend_last_word(current, words[0])
                words = words[1:]
            current.words.extend(words)
            current.changed = True
            self._last_end[speaker] = end
        segment = self._open.get(speaker)
        if segment is not None and segment.end - segment.start >= self._cfg.max_segment_sec:
            self._close(speaker)

    def _close(self, speaker: int) -> None:
        segment = self._open.pop(speaker)
        self._out.append(segment.update(final=True))

    def collect(self, next_offset: float, ended: bool) -> list[SegmentUpdate]:
        """Revisions since the last call. ``next_offset``: where the next step's audio starts."""
        for speaker, segment in list(self._open.items()):
            silent_until = (
                segment.end + self._cfg.sent_break_sec + self._cfg.final_after_silence_sec
            )
            if ended or next_offset > silent_until:
                self._close(speaker)
            elif segment.changed and self._cfg.emit_partials:
                self._out.append(segment.update(final=False))
        out, self._out = self._out, []
        out.sort(key=lambda u: (u.segment_index, u.revision))
        return out

    def open_start(self) -> float | None:
        """Start of the earliest open segment, or None."""
        return min((s.start for s in self._open.values()), default=None)

    def nbytes(self) -> int:
        """Rough bytes held (text and words of open segments)."""
        return sum(len(s.text) + 48 * len(s.words) + 96 for s in self._open.values())


def _extend_last_word(segment: _Segment, piece: WordTiming) -> None:
    if segment.words:
        last = segment.words[-1]
        segment.words[-1] = WordTiming(last.text + piece.text, last.start_s, piece.end_s)
    else:
        segment.words.append(piece)
