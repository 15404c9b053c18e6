"""The two NeMo models the engine steps: load real checkpoints, or build random stand-ins.

The pipeline is NVIDIA's streaming multi-talker pair: a Sortformer diarizer
(``SortformerEncLabelModel``, e.g. ``nvidia/diar_streaming_sortformer_4spk-v2.1``) says who
speaks when, and a cache-aware FastConformer RNN-T with speaker kernels
(``EncDecMultiTalkerRNNTBPEModel``, e.g. ``nvidia/multitalker-parakeet-streaming-0.6b-v1``)
transcribes one speaker per instance.

``load_models`` takes, for each model, either a pretrained name or a path to a ``.nemo`` file.

``build_random_models`` writes randomly initialised models of the same two classes, built from
the configs below with no download, so tests, CI and benchmarks run without the real weights:
``"tiny"`` (about 0.3 M parameters each, ~1.5 MB files, seconds on a CPU) for tests, and ``"real"``
(the real checkpoints' layer counts and widths) for memory and speed measurements. The weights
are noise, so transcripts are nonsense, but every tensor shape, cache and code path is the real
one. Files are cached under ``cache_dir``, named by size, seed and a hash of everything that
goes into them, and written atomically under a lock, so concurrent test processes share them.

Thread rules: nothing here keeps state; call these before the engine's GPU thread starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from nemo.collections.asr.models import EncDecMultiTalkerRNNTBPEModel, SortformerEncLabelModel

__all__ = [
    "BUILD_VERSION",
    "LoadedModels",
    "ModelLoadError",
    "build_random_models",
    "load_models",
]

# Part of every cached file's name: bump it when the build changes in a way the configs don't show.
BUILD_VERSION = 1

_CORPUS_PATH = Path(__file__).with_name("tokenizer_corpus.txt")
_HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(Exception):
    """A model could not be loaded or built; the message names the source and the cause."""


@dataclass(frozen=True)
class LoadedModels:
    """Both models in eval mode without gradients, on one device, with ids for output events."""

    diarizer: SortformerEncLabelModel
    asr: EncDecMultiTalkerRNNTBPEModel
    device: torch.device
    diarizer_id: str  # "nvidia/name@<commit8>" or "<file name>@<sha256 prefix>"
    asr_id: str


# --------------------------------------------------------------------------------------------
# Loading


def load_models(
    diarizer: str, asr: str, device: str | None = None, cache_dir: Path | None = None
) -> LoadedModels:
    """Load the diarizer and the ASR model from pretrained names or ``.nemo`` paths.

    A source ending in ``.nemo`` is a local file; anything else is a pretrained name
    ("org/name" on the Hugging Face Hub, downloaded into ``cache_dir`` if given, else into the
    hub's default cache; a bare name goes to NeMo's NGC lookup). ``device`` defaults to CUDA
    when available. Raises ``ModelLoadError`` with the source and the cause on any failure,
    including a name that is neither cached nor downloadable (quickly, when the hub is
    unreachable).
    """
    from nemo.collections.asr.models import EncDecMultiTalkerRNNTBPEModel as AsrClass
    from nemo.collections.asr.models import SortformerEncLabelModel as DiarizerClass

    target = _resolve_device(device)
    diar_model, diar_id = _load_one("diarizer", DiarizerClass, diarizer, target, cache_dir)
    asr_model, asr_id = _load_one("ASR model", AsrClass, asr, target, cache_dir)
    return LoadedModels(
        diarizer=diar_model, asr=asr_model, device=target, diarizer_id=diar_id, asr_id=asr_id
    )


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"invalid device {device!r}: {err}") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return target


def _load_one(
    role: str, cls: type, source: str, device: torch.device, cache_dir: Path | None
) -> tuple[Any, str]:
    try:
        if source.endswith(".nemo"):
            path = Path(source)
            if not path.is_file():
                raise ModelLoadError(f"cannot load {role}: no such .nemo file: {path}")
            model = cls.restore_from(restore_path=str(path), map_location=device)
            model_id = f"{path.name}@{_file_digest(path)[:12]}"
        elif "/" in source:
            path, revision = _download_from_hub(source, cache_dir)
            model = cls.restore_from(restore_path=str(path), map_location=device)
            model_id = f"{source}@{revision[:8]}" if revision else source
        else:
            model = cls.from_pretrained(source, map_location=device)
            model_id = source
    except ModelLoadError:
        raise
    except Exception as err:  # NeMo and the hub raise many types; the caller needs one.
        raise ModelLoadError(
            f"cannot load {role} from {source!r}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, cls):
        raise ModelLoadError(
            f"{role} from {source!r} is a {type(model).__name__}, expected {cls.__name__}"
        )
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, model_id


def _download_from_hub(name: str, cache_dir: Path | None) -> tuple[Path, str]:
    """The ``<basename>.nemo`` file of hub repo ``name`` and its commit, from cache or download.

    NeMo's ``from_pretrained`` does the same lookup but ignores ``cache_dir`` and, offline,
    retries for about 25 s before failing; this checks the cache first and fails fast.
    """
    from huggingface_hub import constants, hf_hub_download

    filename = f"{name.rsplit('/', 1)[-1]}.nemo"
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        path = hf_hub_download(name, filename, cache_dir=cache, local_files_only=True)
    except Exception:  # not cached (or a broken cache entry): try the network below
        path = None
    if path is None:
        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"pretrained model {name!r} is not in the cache and the hub is offline "
                "(HF_HUB_OFFLINE is set)"
            )
        _probe_hub(constants.ENDPOINT, name)
        path = hf_hub_download(name, filename, cache_dir=cache)
    # Hub cache layout: .../snapshots/<commit>/<file>.
    revision = Path(path).parent.name if Path(path).parent.parent.name == "snapshots" else ""
    return Path(path), revision


def _probe_hub(endpoint: str, name: str) -> None:
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or endpoint
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise ModelLoadError(
            f"pretrained model {name!r} is not in the cache and {endpoint} is unreachable "
            f"({err}); download it where the hub is reachable, or pass a .nemo path"
        ) from err


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Random stand-ins


Size = Literal["tiny", "real"]

# Widths and depths. "real" copies the released checkpoints: the diarizer is a 17 x 512
# FastConformer (NEST) plus an 18 x 192 Transformer (~117 M); the ASR model is a 24 x 1024
# cache-aware FastConformer, 8x subsampling, 2-layer 640 LSTM prediction net, vocabulary 1024,
# with speaker kernels at layer 0 (~0.6 B).
_DIMS: dict[str, dict[str, int]] = {
    "tiny": {
        "fc_d_model": 64,
        "fc_layers": 2,
        "fc_heads": 4,
        "fc_conv_channels": 32,
        "tf_d_model": 32,
        "tf_layers": 2,
        "tf_inner": 128,
        "tf_heads": 4,
        "asr_d_model": 64,
        "asr_layers": 2,
        "asr_heads": 4,
        "asr_conv_channels": 32,
        "pred_hidden": 64,
        "pred_layers": 2,
        "joint_hidden": 64,
        "vocab_size": 128,
    },
    "real": {
        "fc_d_model": 512,
        "fc_layers": 17,
        "fc_heads": 8,
        "fc_conv_channels": 256,
        "tf_d_model": 192,
        "tf_layers": 18,
        "tf_inner": 768,
        "tf_heads": 8,
        "asr_d_model": 1024,
        "asr_layers": 24,
        "asr_heads": 8,
        "asr_conv_channels": 256,
        "pred_hidden": 640,
        "pred_layers": 2,
        "joint_hidden": 640,
        "vocab_size": 1024,
    },
}

_SAMPLE_RATE = 16000
_TRANSFORMER_ENCODER = (
    "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder"
)
_N_MELS = 128  # both models read the same 128-bin log-mel chunks in the streaming pipeline
_MAX_SPEAKERS = 4


def _preprocessor_config() -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": _SAMPLE_RATE,
        "normalize": "NA",  # no per-utterance normalisation: streaming needs it
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": _N_MELS,
        "n_fft": 512,
        "frame_splicing": 1,
        "dither": 0.00001,
        "pad_to": 0,
    }


def _test_ds_config(**extra: Any) -> dict[str, Any]:
    # Not used for streaming, but NeMo's example scripts and transcribe() read these keys.
    return {
        "manifest_filepath": None,
        "sample_rate": _SAMPLE_RATE,
        "batch_size": 1,
        "shuffle": False,
        "num_workers": 0,
        "pin_memory": False,
        **extra,
    }


def diarizer_config(size: Size) -> dict[str, Any]:
    """The Sortformer config: the v2 streaming recipe, at the given size."""
    d = _DIMS[size]
    return {
        "sample_rate": _SAMPLE_RATE,
        "pil_weight": 0.5,
        "ats_weight": 0.5,
        "max_num_of_spks": _MAX_SPEAKERS,
        "streaming_mode": True,
        # NeMo's SpeakerTaggedASR builds a synchronous streaming state (its
        # init_streaming_state call passes no async flag), so async must stay off to run it.
        "async_streaming": False,
        "model_defaults": {"fc_d_model": d["fc_d_model"], "tf_d_model": d["tf_d_model"]},
        "test_ds": _test_ds_config(num_spks=_MAX_SPEAKERS, session_len_sec=-1, soft_targets=False),
        "preprocessor": _preprocessor_config(),
        "sortformer_modules": {
            "_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
            "num_spks": _MAX_SPEAKERS,
            "dropout_rate": 0.5,
            "fc_d_model": d["fc_d_model"],
            "tf_d_model": d["tf_d_model"],
            "subsampling_factor": 8,
            # 80 ms frames. The chunk matches the ASR's 1.12 s step ([70, 13] look-ahead).
            "spkcache_len": 188,
            "fifo_len": 188,
            "chunk_len": 14,
            "spkcache_update_period": 144,
            "chunk_left_context": 0,
            "chunk_right_context": 0,
            "spkcache_sil_frames_per_spk": 3,
            "scores_add_rnd": 0,
            "pred_score_threshold": 0.25,
            "max_index": 99999,
            "scores_boost_latest": 0.05,
            "sil_threshold": 0.2,
            "strong_boost_rate": 0.75,
            "weak_boost_rate": 1.5,
            "min_pos_scores_rate": 0.5,
            "causal_attn_rate": 0.5,
            "causal_attn_rc": 7,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": _N_MELS,
            "feat_out": -1,
            "n_layers": d["fc_layers"],
            "d_model": d["fc_d_model"],
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": d["fc_conv_channels"],
            "causal_downsampling": False,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": d["fc_heads"],
            "att_context_size": [-1, -1],
            "att_context_style": "regular",
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "conv_context_size": None,
            "dropout": 0.1,
            "dropout_pre_encoder": 0.1,
            "dropout_emb": 0.0,
            "dropout_att": 0.1,
        },
        "transformer_encoder": {
            "_target_": _TRANSFORMER_ENCODER,
            "num_layers": d["tf_layers"],
            "hidden_size": d["tf_d_model"],
            "inner_size": d["tf_inner"],
            "num_attention_heads": d["tf_heads"],
            "attn_score_dropout": 0.5,
            "attn_layer_dropout": 0.5,
            "ffn_dropout": 0.5,
            "hidden_act": "relu",
            "pre_ln": False,
            "pre_ln_final_layer_norm": True,
        },
        "loss": {
            "_target_": "nemo.collections.asr.losses.bce_loss.BCELoss",
            "weight": None,
            "reduction": "mean",
        },
    }


def asr_config(size: Size, tokenizer_dir: str = "") -> dict[str, Any]:
    """The multi-talker RNN-T config: cache-aware streaming FastConformer + speaker kernels."""
    d = _DIMS[size]
    return {
        "sample_rate": _SAMPLE_RATE,
        "compute_eval_loss": False,
        "log_prediction": False,
        "skip_nan_grad": False,
        "model_defaults": {
            "enc_hidden": d["asr_d_model"],
            "pred_hidden": d["pred_hidden"],
            "joint_hidden": d["joint_hidden"],
        },
        # Speaker kernels (SpeakerKernelMixin): a feed-forward block for the target speaker's
        # activity and one for everyone else's, added to the input of encoder layer 0.
        "spk_kernel_type": "ff",
        "spk_kernel_layers": [0],
        "add_bg_spk_kernel": True,
        "test_ds": _test_ds_config(use_start_end_token=False),
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": _preprocessor_config(),
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": _N_MELS,
            "feat_out": -1,
            "n_layers": d["asr_layers"],
            "d_model": d["asr_d_model"],
            "use_bias": True,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": d["asr_conv_channels"],
            "causal_downsampling": True,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": d["asr_heads"],
            # Look-aheads of 13, 6, 1 and 0 frames (1.12 s, 0.56 s, 0.16 s, 0.08 s chunks) with
            # 70 frames of left context; the first is the default.
            "att_context_size": [[70, 13], [70, 6], [70, 1], [70, 0]],
            "att_context_style": "chunked_limited",
            "att_context_probs": None,
            "xscaling": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "layer_norm",
            "conv_context_size": "causal",
            "dropout": 0.1,
            "dropout_pre_encoder": 0.1,
            "dropout_emb": 0.0,
            "dropout_att": 0.1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {
                "pred_hidden": d["pred_hidden"],
                "pred_rnn_layers": d["pred_layers"],
                "t_max": None,
                "dropout": 0.2,
            },
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": True,
            "fused_batch_size": 4,
            "jointnet": {"joint_hidden": d["joint_hidden"], "activation": "relu", "dropout": 0.2},
        },
        # Random weights emit a token at every decoder step: the tiny model stops at one per
        # frame so tests and the demo decode about as much as a real model does; the
        # real-size variant keeps the checkpoint's 10 (a worst case for decoding time).
        "decoding": {
            "strategy": "greedy_batch",
            "greedy": {"max_symbols": 1 if size == "tiny" else 10},
        },
        "loss": {"loss_name": "default"},
    }


def build_random_models(size: Size, cache_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Random-weight (diarizer, ASR) ``.nemo`` files of the real classes; cached in ``cache_dir``.

    Deterministic for a given size, seed and NeMo version. A second call (from any process)
    returns the cached files without rebuilding. Raises ``ModelLoadError`` if the build fails.
    """
    if size not in _DIMS:
        raise ValueError(f"size must be one of {sorted(_DIMS)}, got {size!r}")
    import nemo

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = _CORPUS_PATH.read_bytes()
    key = _build_key(
        {
            "build": BUILD_VERSION,
            "nemo": nemo.__version__,
            "torch": torch.__version__,
            "seed": seed,
            "diarizer": diarizer_config(size),
            "asr": asr_config(size),
            "corpus": hashlib.sha256(corpus).hexdigest(),
        }
    )
    diar_path = cache_dir / f"random-diarizer-{size}-s{seed}-{key}.nemo"
    asr_path = cache_dir / f"random-asr-{size}-s{seed}-{key}.nemo"
    if diar_path.is_file() and asr_path.is_file():
        return diar_path, asr_path

    with _file_lock(cache_dir / f".random-{size}-s{seed}-{key}.lock"):
        try:
            if not diar_path.is_file():
                _build_diarizer(size, seed, diar_path)
            if not asr_path.is_file():
                _build_asr(size, seed, asr_path)
        except Exception as err:
            raise ModelLoadError(
                f"building the random {size} models in {cache_dir} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
    return diar_path, asr_path


def _build_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_diarizer(size: Size, seed: int, out: Path) -> None:
    from nemo.collections.asr.models import SortformerEncLabelModel
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = SortformerEncLabelModel(cfg=OmegaConf.create(diarizer_config(size)))
    _save_atomically(model, out)


def _build_asr(size: Size, seed: int, out: Path) -> None:
    from nemo.collections.asr.models import EncDecMultiTalkerRNNTBPEModel
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tokenizer-") as tokenizer_dir:
        _train_tokenizer(Path(tokenizer_dir), _DIMS[size]["vocab_size"])
        torch.manual_seed(seed)
        model = EncDecMultiTalkerRNNTBPEModel(
            cfg=OmegaConf.create(asr_config(size, tokenizer_dir=tokenizer_dir))
        )
        _save_atomically(model, out)


def _save_atomically(model: Any, out: Path) -> None:
    # save_to tars into the target path; write beside it and rename, so a reader never sees a
    # partial file and a crash leaves only a ".tmp" behind.
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.{time.monotonic_ns()}.tmp.nemo")
    try:
        model.save_to(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A SentencePiece BPE tokenizer from the bundled corpus, in NeMo's tokenizer-dir layout."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.Train(
        input=str(_CORPUS_PATH),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=True,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    # vocab.txt as NeMo's create_spt_model writes it: word-initial pieces bare, others "##".
    tokens = []
    for line in (out_dir / "tokenizer.vocab").read_text(encoding="utf8").splitlines():
        piece = line.split("\t")[0]
        if piece in ("<s>", "</s>", "<pad>", "<unk>"):
            continue
        token = piece[1:] if piece.startswith("▁") else f"##{piece}"
        tokens.append(token or piece[0])
    (out_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf8")
