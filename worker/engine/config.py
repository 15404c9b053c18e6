"""Streaming and batching settings of the engine (no heavy imports: the CLI reads these)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("fp32", "bf16", "fp64")

_HINTS = {
    "dtype": f"dtype must be one of {', '.join(DTYPES)}",
    "allow_tf32": "allow_tf32 lowers fp32 matmuls to TF32 and cannot apply with dtype fp64",
}


@dataclass(frozen=True)
class EngineConfig:
    """Streaming and batching settings of the engine (defaults: NVIDIA's multitalker example)."""

    att_context_size: tuple[int, int] = (70, 13)
    spkcache_len: int = 188
    fifo_len: int = 188
    spkcache_update_period: int = 144
    max_speakers: int = 4
    cache_gating: bool = True
    cache_gating_buffer_size: int = 2
    binary_diar_preds: bool = True
    decoding_strategy: str = "greedy_batch"
    sent_break_sec: float = 1.0
    final_after_silence_sec: float = 2.0
    max_segment_sec: float = 60.0
    emit_partials: bool = True
    max_streams_per_step: int = 64
    max_instances_per_step: int = 256
    max_buffered_audio_sec: float = 30.0
    # Numeric precision of the model forwards: "fp32"; "bf16" (autocast around the diarizer and
    # ASR encoder forwards only, weights and state stay float32, the preprocessor and the RNN-T
    # decoder run as NeMo keeps them); "fp64" (the models loaded in float64: exact comparisons).
    dtype: str = "fp32"
    # TF32 tensor-core matmuls and convolutions on CUDA: faster fp32, about bf16's mantissa.
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_speakers": 1 <= self.max_speakers <= 4,
            "cache_gating_buffer_size": self.cache_gating_buffer_size >= 1,
            "max_streams_per_step": self.max_streams_per_step >= 1,
            "max_instances_per_step": self.max_instances_per_step >= 1,
            "max_buffered_audio_sec": self.max_buffered_audio_sec > 0,
            "sent_break_sec": self.sent_break_sec >= 0,
            "final_after_silence_sec": self.final_after_silence_sec >= 0,
            "max_segment_sec": self.max_segment_sec > 0,
            "decoding_strategy": self.decoding_strategy in {"greedy", "greedy_batch"},
            "dtype": self.dtype in DTYPES,
            "allow_tf32": not (self.allow_tf32 and self.dtype == "fp64"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            hints = "".join(f"; {_HINTS[name]}" for name in bad if name in _HINTS)
            raise ValueError(f"invalid engine settings: {', '.join(bad)} (got {self}){hints}")
