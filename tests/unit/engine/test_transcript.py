"""worker.engine.transcript: NeMo's segment rules, then partial revisions and finals.

Pure Python, no models. Each step of a script is the text each speaker added in one model step
(as the engine hands it over) followed by ``collect(next_offset)``; the tables give the segments
that come out.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import pytest

from worker.engine.transcript import (
    AssemblerConfig,
    SegmentUpdate,
    TranscriptAssembler,
    WordTiming,
)

STEP = 1.12
DEFAULT = AssemblerConfig(sent_break_sec=1.0, final_after_silence_sec=2.0, max_segment_sec=60.0)


@dataclass(frozen=True)
class Say:
    """One speaker's new text in one step, its words spread evenly over ``start..end``."""

    speaker: int
    text: str
    start: float
    end: float
    continues_word: bool = False

    def words(self) -> list[WordTiming]:
        parts = self.text.split()
        if not parts:
            return []
        width = (self.end - self.start) / len(parts)
        return [
            WordTiming(p, round(self.start + i * width, 3), round(self.start + (i + 1) * width, 3))
            for i, p in enumerate(parts)
        ]


def add(assembler: TranscriptAssembler, say: Say) -> None:
    assembler.add_text(
        say.speaker,
        say.text,
        say.start,
        say.end,
        say.words(),
        continues_word=say.continues_word,
    )


def run(
    steps: list[list[Say]], config: AssemblerConfig = DEFAULT, end: bool = True
) -> list[list[SegmentUpdate]]:
    """Step ``k`` covers ``[k*STEP, (k+1)*STEP)``; returns each collect's updates, the last one
    at the end of the stream when ``end``."""
    assembler = TranscriptAssembler(config)
    out = []
    for k, says in enumerate(steps):
        for say in says:
            add(assembler, say)
        out.append(assembler.collect(next_offset=(k + 1) * STEP, ended=False))
    if end:
        out.append(assembler.collect(next_offset=len(steps) * STEP, ended=True))
    return out


def finals(updates: list[list[SegmentUpdate]]) -> list[tuple[str, str, float, float]]:
    return [(u.speaker, u.text, u.start_s, u.end_s) for step in updates for u in step if u.final]


# --- segment rules -----------------------------------------------------------------------------

SEGMENT_RULES = {
    "text within the break extends the segment": (
        [[Say(0, "hello", 0.5, 1.0)], [Say(0, " world", 1.8, 2.2)]],
        [("speaker_0", "Hello world", 0.5, 2.2)],
    ),
    "text exactly at the break still extends": (
        [[Say(0, "hello", 0.5, 1.0)], [Say(0, " world", 2.0, 2.2)]],
        [("speaker_0", "Hello world", 0.5, 2.2)],
    ),
    "text after the break opens a new segment": (
        [[Say(0, "hello", 0.5, 1.0)], [Say(0, " again", 2.01, 2.2)]],
        [("speaker_0", "Hello", 0.5, 1.0), ("speaker_0", "Again", 2.01, 2.2)],
    ),
    "a leading full stop closes the old segment": (
        [[Say(0, "hello there", 0.1, 1.0)], [], [Say(0, ". next one", 2.5, 3.0, True)]],
        [("speaker_0", "Hello there.", 0.1, 1.0), ("speaker_0", "Next one", 2.5, 3.0)],
    ),
    "a leading question mark closes the old segment": (
        [[Say(0, "really", 0.1, 1.0)], [], [Say(0, "? yes", 2.5, 3.0, True)]],
        [("speaker_0", "Really?", 0.1, 1.0), ("speaker_0", "Yes", 2.5, 3.0)],
    ),
    "a leading comma after spaces closes the old segment": (
        [[Say(0, "well", 0.1, 1.0)], [], [Say(0, "  , then", 2.5, 3.0, True)]],
        [("speaker_0", "Well,", 0.1, 1.0), ("speaker_0", "Then", 2.5, 3.0)],
    ),
    "punctuation alone closes the old segment and opens none": (
        [[Say(0, "stop", 0.1, 1.0)], [], [Say(0, "!", 2.5, 2.6, True)]],
        [("speaker_0", "Stop!", 0.1, 1.0)],
    ),
    "punctuation within the break just extends": (
        [[Say(0, "hello", 0.1, 1.0)], [Say(0, ". yes", 1.5, 2.0, True)]],
        [("speaker_0", "Hello. yes", 0.1, 2.0)],
    ),
    "the first word is capitalised, only in a new segment": (
        [[Say(0, "  good morning", 0.2, 1.0)], [Say(0, " sir", 1.3, 1.6)]],
        [("speaker_0", "Good morning sir", 0.2, 1.6)],
    ),
    "capitalize lowercases the rest of the first word, as NeMo does": (
        [[Say(0, "iPhone", 0.2, 1.0)]],
        [("speaker_0", "Iphone", 0.2, 1.0)],
    ),
    "speakers keep separate segments": (
        [[Say(0, "hi", 0.1, 0.5), Say(1, "hello", 0.3, 0.9)], [Say(0, " there", 1.2, 1.5)]],
        [("speaker_0", "Hi there", 0.1, 1.5), ("speaker_1", "Hello", 0.3, 0.9)],
    ),
    "blank text opens nothing": (
        [[Say(0, "   ", 0.1, 0.5)], [Say(0, "words", 1.2, 1.5)]],
        [("speaker_0", "Words", 1.2, 1.5)],
    ),
    "a sub-word piece within the break joins the last word": (
        [[Say(0, "hel", 0.1, 0.5)], [Say(0, "lo", 1.2, 1.5, True)]],
        [("speaker_0", "Hello", 0.1, 1.5)],
    ),
}


@pytest.mark.parametrize(("steps", "expected"), SEGMENT_RULES.values(), ids=SEGMENT_RULES.keys())
def test_segment_rules(steps: list[list[Say]], expected: list[tuple]) -> None:
    got = sorted(finals(run(steps)), key=lambda s: (s[2], s[0]))
    assert got == sorted(expected, key=lambda s: (s[2], s[0]))


def test_words_follow_the_text() -> None:
    updates = run(
        [
            [Say(0, "hel", 0.1, 0.5)],
            [Say(0, "lo world", 1.2, 1.9, True)],
            [],
            [Say(0, ". next", 3.5, 4.0, True)],
        ]
    )
    first, second = [u for step in updates for u in step if u.final]
    assert [w.text for w in first.words] == ["Hello", "world."]
    assert first.words[0] == WordTiming("Hello", 0.1, 1.55)  # the joined piece ends it
    assert [w.text for w in second.words] == ["Next"]
    for seg in (first, second):
        assert " ".join(w.text for w in seg.words) == seg.text


def test_words_follow_the_text_when_a_word_piece_starts_a_new_segment() -> None:
    updates = run([[Say(0, "hello word", 0.1, 1.0)], [], [Say(0, "ing more", 2.5, 3.0, True)]])
    for seg in (u for step in updates for u in step if u.final):
        assert " ".join(w.text for w in seg.words) == seg.text


# --- finals ------------------------------------------------------------------------------------


def test_final_when_the_same_speaker_opens_a_new_segment() -> None:
    updates = run([[Say(0, "one", 0.1, 0.5)], [Say(0, " two", 1.6, 2.0)]], end=False)
    assert [(u.text, u.final) for u in updates[0]] == [("One", False)]
    assert [(u.text, u.final) for u in updates[1]] == [("One", True), ("Two", False)]


def test_final_after_silence_past_the_break() -> None:
    # Ends at 0.5: new text would open a new segment after 1.5, final once 3.5 is passed.
    assembler = TranscriptAssembler(DEFAULT)
    add(assembler, Say(0, "quiet", 0.1, 0.5))
    assert [u.final for u in assembler.collect(1.12, ended=False)] == [False]
    assert assembler.collect(3.5, ended=False) == []  # not changed, not yet final
    (update,) = assembler.collect(3.51, ended=False)
    assert update.final and update.text == "Quiet" and update.revision == 1
    assert assembler.open_start() is None


def test_final_at_max_segment_length() -> None:
    config = AssemblerConfig(sent_break_sec=1.0, final_after_silence_sec=2.0, max_segment_sec=3.0)
    steps = [[Say(0, f" w{k}", k * STEP, k * STEP + 1.0)] for k in range(6)]
    updates = run(steps, config, end=False)
    cut = [u for step in updates for u in step if u.final]
    assert cut, "a monologue must be cut at max_segment_sec"
    assert all(u.end_s - u.start_s >= 3.0 for u in cut)
    assert all(u.end_s - u.start_s < 3.0 + STEP for u in cut)
    # The text after the cut is a new segment even though it follows within the break.
    assert updates[3][-1].segment_index == cut[0].segment_index + 1
    assert not updates[3][-1].final


def test_final_at_the_end_of_the_stream() -> None:
    assembler = TranscriptAssembler(DEFAULT)
    add(assembler, Say(0, "a", 0.1, 0.5))
    add(assembler, Say(1, "b", 0.2, 0.6))
    assembler.collect(1.12, ended=False)
    updates = assembler.collect(1.12, ended=True)
    assert [(u.speaker, u.final, u.revision) for u in updates] == [
        ("speaker_0", True, 1),
        ("speaker_1", True, 1),
    ]
    assert assembler.collect(2.24, ended=True) == []


def test_text_after_a_silence_final_opens_a_new_segment() -> None:
    """NeMo would extend the finalised segment; a final must stay final."""
    assembler = TranscriptAssembler(DEFAULT)
    add(assembler, Say(0, "first", 0.1, 0.5))
    assembler.collect(1.12, ended=False)
    (final,) = assembler.collect(4.0, ended=False)
    add(assembler, Say(0, " second", 1.4, 1.5))  # within the break of the old end
    (update,) = assembler.collect(4.48, ended=False)
    assert final.final and update.segment_index == final.segment_index + 1
    assert update.text == "Second" and not update.final


# --- revisions ---------------------------------------------------------------------------------


def test_partial_revisions_then_final_with_the_next_revision() -> None:
    steps = [
        [Say(0, "one", 0.1, 0.5)],
        [Say(0, " two", 1.2, 1.6)],
        [],  # no change: no revision
        [Say(0, " three", 2.4, 2.6)],
        [Say(0, " four", 3.5, 3.7)],
    ]
    updates = run(steps)
    flat = [(u.revision, u.final, u.text) for step in updates for u in step]
    assert flat == [
        (0, False, "One"),
        (1, False, "One two"),
        (2, False, "One two three"),
        (3, False, "One two three four"),
        (4, True, "One two three four"),
    ]
    assert updates[2] == []


def test_no_partials_when_disabled() -> None:
    config = AssemblerConfig(emit_partials=False)
    updates = run(
        [[Say(0, "one", 0.1, 0.5)], [Say(0, " two", 1.2, 1.6)], [Say(1, "x", 2.3, 2.5)]], config
    )
    flat = [(u.speaker, u.revision, u.final, u.text) for step in updates for u in step]
    assert flat == [("speaker_0", 0, True, "One two"), ("speaker_1", 0, True, "X")]


def test_segment_indices_count_segments_across_speakers() -> None:
    updates = run(
        [
            [Say(1, "a", 0.1, 0.2), Say(0, "b", 0.3, 0.4)],
            [],
            [Say(1, " c", 2.5, 2.6)],
        ]
    )
    by_index = {u.segment_index: (u.speaker, u.text) for step in updates for u in step}
    assert by_index == {0: ("speaker_1", "A"), 1: ("speaker_0", "B"), 2: ("speaker_1", "C")}
    # Within one collect, updates come in segment order.
    for step in updates:
        keys = [(u.segment_index, u.revision) for u in step]
        assert keys == sorted(keys)


def test_open_start() -> None:
    assembler = TranscriptAssembler(DEFAULT)
    assert assembler.open_start() is None
    add(assembler, Say(1, "late", 0.9, 1.0))
    add(assembler, Say(0, "early", 0.3, 0.5))
    assert assembler.open_start() == 0.3
    assembler.collect(1.12, ended=False)
    add(assembler, Say(0, " again", 2.0, 2.2))  # speaker 0 starts over: segment at 2.0
    assert assembler.open_start() == 0.9
    assembler.collect(2.24, ended=True)
    assert assembler.open_start() is None


# --- invariants over random scripts ------------------------------------------------------------


def random_script(seed: int, steps: int = 120) -> list[list[Say]]:
    rng = random.Random(seed)
    talkative = 0.35 if seed % 2 else 0.9  # odd seeds: pauses; even: monologues cut at the cap
    vocab = ["yes", "no", "maybe", "the", "call", "order", "twelve", "ok"]
    script = []
    for k in range(steps):
        says = []
        for spk in range(4):
            if rng.random() < talkative:
                if talkative > 0.5:  # gaps stay within the break
                    start = k * STEP + rng.uniform(0.0, 0.3)
                    end = start + rng.uniform(0.5, 0.8)
                else:
                    start = k * STEP + rng.uniform(0.0, 0.9)
                    end = min(start + rng.uniform(0.05, 0.2), (k + 1) * STEP)
                words = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3)))
                lead = rng.choice(["", " ", ". ", ", ", "? "])
                says.append(Say(spk, lead + words, round(start, 3), round(end, 3), lead[:1] != " "))
        script.append(says)
    return script


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("emit_partials", [True, False])
def test_invariants_on_random_scripts(seed: int, emit_partials: bool) -> None:
    config = AssemblerConfig(
        sent_break_sec=1.0,
        final_after_silence_sec=2.0,
        max_segment_sec=8.0,
        emit_partials=emit_partials,
    )
    assembler = TranscriptAssembler(config)
    revisions: dict[int, list[int]] = defaultdict(list)
    finalised: set[int] = set()
    speaker_of: dict[int, str] = {}
    for k, says in enumerate(random_script(seed)):
        for say in says:
            add(assembler, say)
        for update in assembler.collect((k + 1) * STEP, ended=False):
            assert update.segment_index not in finalised, "a revision after a final"
            revisions[update.segment_index].append(update.revision)
            speaker_of.setdefault(update.segment_index, update.speaker)
            assert speaker_of[update.segment_index] == update.speaker
            assert update.text and update.text[0] == update.text[0].upper()
            if update.final:
                finalised.add(update.segment_index)
            if not emit_partials:
                assert update.final and update.revision == 0
        open_per_speaker = defaultdict(int)
        for index in set(revisions) - finalised:
            open_per_speaker[speaker_of[index]] += 1
        assert max(open_per_speaker.values(), default=0) <= 1
        start = assembler.open_start()
        if start is not None:
            assert start <= (k + 1) * STEP
    for update in assembler.collect(999.0, ended=True):
        assert update.segment_index not in finalised
        revisions[update.segment_index].append(update.revision)
        finalised.add(update.segment_index)
    assert finalised == set(revisions) == set(range(assembler.segments_opened))
    for seq in revisions.values():
        assert seq == list(range(len(seq)))  # 0, 1, 2, … with no gaps, the last one final
    assert assembler.open_start() is None
    assert assembler.nbytes() == 0
