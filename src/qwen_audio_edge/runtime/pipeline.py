"""`Pipeline.from_artifacts(dir)`: the one public entry point of the lean runtime.

audio → audio.py (load, segment, log-mel) → encoder.py (ONNX Runtime or torch) → decoder.py (static KV
cache) → generate.py (sampling, stop, text streaming). A `Conversation` keeps the KV cache across turns:
a new turn prefills only the ids not yet in the cache, so turn N costs its own tokens, not the history.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import Artifacts, load_manifest
from .audio import MelConfig, MelFrontEnd, load_audio, num_audio_tokens, prepare_waveform, split_segments
from .decoder import KVCache, Qwen2Decoder, load_decoder
from .block_encoder import BlockBatch, BlockCausalEncoder
from .encoder import EncoderConfig, OnnxEncoder, TorchEncoder, load_encoder_module
from .errors import ArtifactsError, AudioError, LimitError, NumericalError, OptionsError
from .generate import GenerationStats, IncrementalDetokenizer, SamplingOptions, generate
from .generation_config import effective_generation_config, resolve_sampling, stop_token_ids
from .prompt import PromptFormat, embed_prompt, user_message
from .quant_linear import Int8Linear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: device, activation dtype, context size, encoder backend and threads."""

    device: str = "cpu"
    dtype: str = "fp32"
    max_context: int | None = None  # None: the config's max_position_embeddings, capped to fit memory
    encoder_backend: str = "onnx"  # onnx | torch
    encoder_precision: str | None = None  # fp32 | fp16 (which exported encoder); None: the export's default
    threads: int | None = None
    verify_hashes: bool = True
    w4_kernel: str = "auto"  # auto | ref | cpu | triton (GPTQ decoders only)
    w4_tune: bool = True  # Triton: time launch configs per layer shape on first use (kernels/w4_triton.py Tuner)
    # q/k/v and gate/up as one matmul each, and on CUDA one Triton launch per norm / RoPE / SwiGLU
    # (False keeps the checkpoint's modules and plain torch ops, e.g. for hooks or debugging)
    fuse: bool = True
    cuda_graphs: bool = True  # on CUDA: decode steps replayed as CUDA graphs (runtime/decode_graph.py)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise OptionsError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.encoder_backend not in ("onnx", "torch"):
            raise OptionsError(f"encoder backend must be onnx or torch, got {self.encoder_backend!r}")
        if self.max_context is not None and self.max_context < 2:
            raise OptionsError(f"max_context must be ≥ 2, got {self.max_context}")
        if self.w4_kernel not in ("auto", "ref", "cpu", "triton"):
            raise OptionsError(f"w4 kernel must be auto, ref, cpu or triton, got {self.w4_kernel!r}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be ≥ 1, got {self.threads}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError) as e:
            raise OptionsError(f"device {self.device!r} is not a device name: use cpu, cuda or cuda:N") from e
        if dev.type not in ("cpu", "cuda"):
            raise OptionsError(f"device {self.device!r} is not supported: use cpu, cuda or cuda:N")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise OptionsError(f"device {self.device!r} requested but torch sees no CUDA GPU; use --device cpu")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise OptionsError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")


@dataclass(frozen=True)
class PendingTurn:
    """A user turn whose prompt prefix (up to its first audio slot) is already in the KV cache."""

    message: dict
    rest: list[int]  # the turn's remaining ids, audio slots not yet expanded
    n_audio: int
    prefilled: int  # ids of this turn prefilled by begin_turn
    blockwise: bool = False  # one audio slot filled block by block (chunked streaming): every mel belongs to it
    audio_done: int = 0  # audio tokens of that slot already prefilled by extend_audio


@dataclass(frozen=True)
class PrefilledTurn:
    """A turn whose audio is encoded and whose whole prompt is in the KV cache (first logits ready)."""

    turn: PendingTurn
    new_ids: list[int]
    n_pending: int
    logits: torch.Tensor
    audio_tokens: int
    start: int
    encoder_ms: float
    prefill_ms: float
    audio_embeds: torch.Tensor | None = None  # this prefill's audio embeddings (kept for the context policy)


@dataclass
class TurnResult:
    """What one turn produced: the text, the new token ids, why it stopped, and stage timings."""

    text: str
    token_ids: list[int]
    finish_reason: str
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason, "timings": self.timings}


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


class Pipeline:
    """Loaded model + tokenizer + front end. Build with `Pipeline.from_artifacts(dir)`."""

    def __init__(self, artifacts: Artifacts, options: RuntimeOptions):
        t0 = time.perf_counter()
        self.artifacts = artifacts
        self.options = options
        self.device = torch.device(options.device)
        self.dtype = DTYPES[options.dtype]
        if options.threads:
            torch.set_num_threads(options.threads)
        m = artifacts.manifest
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.mel = MelFrontEnd(
            MelConfig.from_dict(m["preprocessor"]),
            load_file(str(artifacts.path(m["files_role"]["mel_filters"])))["mel_filters"].float(),
        )
        try:
            tokenizer = Tokenizer.from_file(str(artifacts.path(m["files_role"]["tokenizer"])))
        except Exception as e:  # noqa: BLE001 — tokenizers raises a bare Exception on bad JSON
            raise ArtifactsError(f"tokenizer.json cannot be loaded: {e}; re-export") from e
        template_rel = m["files_role"].get("chat_template")
        template = artifacts.path(template_rel).read_text() if template_rel else None
        self.prompt = PromptFormat(tokenizer, template, artifacts.audio_token_id)
        # What transformers would use (generation_config.json, else derived from config.json): generation_config.py
        self.generation_config = effective_generation_config(m.get("generation_config"), m.get("source", {}).get("config"))
        self.stop_ids = stop_token_ids(self.generation_config, str(artifacts.root))
        self.encoder = self._load_encoder()
        self._block_module: tuple | None = None  # the torch encoder for chunked streaming, loaded on first use
        head = m.get("decoder", {}).get("lm_head_int8")
        self.decoder: Qwen2Decoder = load_decoder(artifacts.path(m["files_role"]["decoder_dir"]), self.dtype, self.device,
                                                  lm_head_int8=artifacts.path(head) if head else None,
                                                  w4_kernel=options.w4_kernel, fuse=options.fuse,
                                                  w4_tune=options.w4_tune)
        self.max_context = self._resolve_max_context()
        self.cache: KVCache = self.decoder.setup_cache(self.max_context)
        self._owner: object | None = None
        self._step = None
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_artifacts(cls, path: str | Path, options: RuntimeOptions | None = None, **kwargs) -> "Pipeline":
        """Verify the manifest (format version, files, sha256) and load everything onto `options.device`."""
        options = options or RuntimeOptions(**kwargs)
        return cls(load_manifest(path, verify_hashes=options.verify_hashes), options)

    def decode_step(self):
        """The static, graph-replayed decode step for the current decoder and cache (CUDA only), else None."""
        if self.device.type != "cuda" or not self.options.cuda_graphs:
            return None
        if self._step is None or self._step.cache is not self.cache or self._step.model is not self.decoder:
            from .decode_graph import DecodeStep

            self._step = DecodeStep(self.decoder, self.cache)
        return self._step

    # --- loading helpers -------------------------------------------------------------------------
    def _load_encoder(self):
        m = self.artifacts.manifest
        enc = m["encoder"]
        precision = self.options.encoder_precision or enc["default"]
        if self.options.encoder_backend == "onnx":
            if precision not in enc["onnx"]:
                raise OptionsError(f"no {precision} ONNX encoder in these artifacts (have {sorted(enc['onnx'])}); "
                                   "re-export with --encoder-dtype fp16 or use --encoder-precision fp32")
            onnx = OnnxEncoder(self.artifacts.path(enc["onnx"][precision]), threads=self.options.threads, device=self.options.device)
            onnx.max_positions = int(self.artifacts.audio_config["max_source_positions"])
            return onnx
        from safetensors.torch import load_file

        cfg = EncoderConfig.from_dict(self.artifacts.audio_config, self.artifacts.text_config["hidden_size"])
        state = load_file(str(self.artifacts.path(enc["weights"])))
        dtype = torch.float32 if self.device.type == "cpu" else (torch.float16 if precision == "fp16" else torch.float32)
        return TorchEncoder(load_encoder_module(cfg, state, dtype), self.device)

    def block_encoder(self) -> BlockCausalEncoder:
        """A fresh block-causal encoder (chunked stream mode) over the artifacts' torch encoder weights.

        It needs the torch module: with the torch backend that is the encoder itself; with ONNX Runtime the
        weights (encoder.safetensors) are loaded once, on first use, in fp32 on CPU (the encoder's size
        again in memory: about 2.5 GB for Qwen2-Audio-7B's, 33 MB for tiny.en-sized ones).
        """
        if self._block_module is None:
            if isinstance(self.encoder, TorchEncoder):
                self._block_module = (self.encoder.module, self.encoder.device)
            else:
                from safetensors.torch import load_file

                cfg = EncoderConfig.from_dict(self.artifacts.audio_config, self.artifacts.text_config["hidden_size"])
                state = load_file(str(self.artifacts.path(self.artifacts.manifest["encoder"]["weights"])))
                self._block_module = (load_encoder_module(cfg, state, torch.float32), torch.device("cpu"))
        module, device = self._block_module
        return BlockCausalEncoder(module, device)

    def _resolve_max_context(self) -> int:
        args = self.decoder.args
        per_token = args.kv_bytes_per_token(self.dtype)
        budget = _available_memory_bytes(self.device) // 2
        fits = max(2, budget // per_token)
        limit = args.max_position_embeddings
        want = self.options.max_context
        if want is None:
            return int(min(limit, fits))
        if want > limit:
            raise LimitError(f"--max-context {want} exceeds the model's max_position_embeddings ({limit})")
        if want > fits:
            raise LimitError(
                f"--max-context {want} needs {want * per_token / 2**30:.2f} GiB of KV cache but only about "
                f"{budget / 2**30:.2f} GiB can be spared on {self.device}; lower --max-context"
            )
        return want

    # --- audio -----------------------------------------------------------------------------------
    def load_waveform(self, audio, sampling_rate: int | None = None) -> np.ndarray:
        """A path, or PCM samples (+ sampling_rate, default the model's), → mono float32 at 16 kHz."""
        sr = self.mel.config.sampling_rate
        if isinstance(audio, (str, Path)):
            return load_audio(audio, sr)
        if isinstance(audio, (np.ndarray, list, tuple, torch.Tensor)):
            try:
                data = audio.detach().cpu().float().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
            except (ValueError, TypeError, RuntimeError) as e:
                raise AudioError(f"audio samples cannot be read as an array: {e}") from e
            return prepare_waveform(data, sr if sampling_rate is None else sampling_rate, sr)
        raise AudioError(f"audio must be a file path or an array of samples, got {type(audio).__name__}")

    def encode_mels(self, mels: list[tuple]) -> list[torch.Tensor]:
        """Encoder outputs [N_i, hidden] per (mel, valid frames[, position offset]) input, checked finite."""
        out = []
        for item in mels:
            emb = item.encode() if isinstance(item, BlockBatch) else self.encoder(*item)
            if not torch.isfinite(emb).all():
                raise NumericalError("the audio encoder produced NaN/Inf (fp16 overflow?); rerun with --encoder-precision fp32")
            out.append(emb)
        return out

    def single_turn(self, audio=None, text: str | None = None, sampling_rate: int | None = None,
                    chunk_seconds: float | None = None, lookahead_seconds: float | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Prompt ids and audio embeddings (concatenated, prompt order) of a one-turn conversation — no decoding.

        chunk_seconds: encode each segment with the chunked stream mode's block-causal rule (runtime/chunked.py,
        `lookahead_seconds` of look-ahead) instead of exactly; the ids are the same either way.
        """
        from .chunked import DEFAULT_LOOKAHEAD_S, block_frames, causal_utterance, lookahead_frames

        self.prompt.check_user_text(text)
        segments = split_segments(self.load_waveform(audio, sampling_rate), self.mel.config) if audio is not None else []
        counts = [num_audio_tokens(self.mel.valid_frames(len(s))) for s in segments]
        ids = self.prompt.expand_audio(self.prompt.encode(self.prompt.render([user_message(len(segments), text)])), counts)
        if chunk_seconds is None:
            embeds = self.encode_mels([self.mel.log_mel(s) for s in segments])
        else:
            block = block_frames(chunk_seconds, self.mel)
            ahead = lookahead_frames(DEFAULT_LOOKAHEAD_S if lookahead_seconds is None else lookahead_seconds, self.mel)
            embeds = self.encode_mels([BlockBatch(self.block_encoder(), tuple(causal_utterance(self.mel, s, block, ahead)))
                                       for s in segments])
        return ids, (torch.cat(embeds) if embeds else None)

    def stream(self, prompt: str | None = None, *, sampling: SamplingOptions | None = None, vad="default",
               on_text: Callable[[str], None] | None = None, options=None, on_event=None):
        """A streaming session (runtime/stream.py): feed PCM chunks, get turns at VAD endpoints or `end()`.

        vad: "default" (VadOptions()), a VadOptions, or None for push-to-talk only.
        options: a StreamOptions (mode exact|chunked, chunk_seconds, speculate, barge_in, context_policy).
        """
        from .stream import StreamOptions, StreamSession, VadOptions

        return StreamSession(self, prompt, sampling=sampling, vad=VadOptions() if vad == "default" else vad, on_text=on_text,
                             options=options or StreamOptions(), on_event=on_event)

    def chat(self, context_policy: str = "error") -> "Conversation":
        """Start a conversation; it owns the KV cache until another conversation starts.

        context_policy: "error" (refuse a turn that does not fit in max_context) or "drop_oldest"
        (drop the oldest exchanges to make room); see `Conversation`.
        """
        return Conversation(self, context_policy)

    def run(self, audio=None, prompt: str | None = None, *, sampling: SamplingOptions | None = None,
            sampling_rate: int | None = None, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """One user turn (audio and/or text) in a fresh conversation."""
        return self.chat().send(audio, prompt, sampling=sampling, sampling_rate=sampling_rate, on_text=on_text)

    def active_paths(self) -> dict:
        """Which implementation runs each stage on this machine. Self-checked fast paths are decided on
        first use per shape class, so after a run this also says which path each shape class took
        (runtime/selfcheck.py); `run --json` prints it under "paths"."""
        enc, dec = self.encoder, self.decoder
        head = dec.lm_head
        if isinstance(head, Int8Linear):
            lm_head = "int8: torch CPU op" if head._cpu_op and self.device.type == "cpu" else "int8: Triton GEMV (self-checked)"
        else:
            lm_head = f"dense {self.options.dtype}"
        return {
            "device": str(self.device),
            "encoder": f"onnxruntime {enc.providers[0]}" if isinstance(enc, OnnxEncoder) else f"torch {enc.device}",
            "decoder_w4": list(getattr(dec, "w4_kernels", [])) or None,  # None: dense (fp16/fp32) decoder weights
            "fused_projections": int(getattr(dec, "fused_projections", 0)),
            "fused_kernels": bool(getattr(dec, "fused_kernels", False)),
            "lm_head": lm_head,
            "cuda_graphs": self.device.type == "cuda" and self.options.cuda_graphs,
            "self_check": dec.selfcheck.report() if hasattr(dec, "selfcheck") else {},
        }

    def default_sampling(self, **overrides) -> SamplingOptions:
        """The checkpoint's generation config with transformers' meaning for every key (absent: transformers'
        default; keys we do not implement, when active: OptionsError), then `overrides` (SamplingOptions
        fields, None = not given). What every run without explicit `sampling=` uses; see generation_config.py."""
        return resolve_sampling(self.generation_config, str(self.artifacts.root), **overrides)


CONTEXT_POLICIES = ("error", "drop_oldest")


@dataclass
class _Exchange:
    """One user turn + its answer: where it starts in the conversation ids, and its audio embeddings."""

    start: int
    base: int  # len(ids) before the turn was begun (an abandoned turn is rolled back to it)
    audio: list[torch.Tensor] = field(default_factory=list)
    # [from, to) of the generated answer in the ids: an answer may contain the audio token id itself, which
    # must not be taken for an audio slot when the conversation is re-prefilled.
    answer: tuple[int, int] | None = None


class Conversation:
    """A multi-turn chat whose KV cache is kept between turns (text-only turns included).

    Context policy when a turn does not fit in `max_context` (with room for `max_new_tokens`):
    "error" (default for `chat()`) refuses the turn with a LimitError; "drop_oldest" (the default for
    streaming sessions) drops whole exchanges (a user turn and its answer), oldest first, keeping the
    system turn and the turn in progress, then re-prefills what is kept from position 0. The kept audio
    is not re-encoded: each exchange keeps its audio embeddings. If the turn still does not fit once
    nothing is left to drop, it is refused as with "error"; if only the room for the answer is short,
    the answer may end early with finish_reason "context_full".
    """

    def __init__(self, pipeline: Pipeline, context_policy: str = "error"):
        if context_policy not in CONTEXT_POLICIES:
            raise OptionsError(f"context policy must be one of {CONTEXT_POLICIES}, got {context_policy!r}")
        self.p = pipeline
        pipeline._owner = self
        self.context_policy = context_policy
        self.messages: list[dict] = []
        self.ids: list[int] = []  # every id of the conversation, as fed or generated
        self.cached = 0  # ids[:cached] are in the KV cache
        self.failed = False
        self.dropped_exchanges = 0  # exchanges removed by the "drop_oldest" policy so far
        self._exchanges: list[_Exchange] = []
        self._open = False  # the last exchange is a turn in progress (begun, not finished)

    def _check_usable(self) -> None:
        if self.p._owner is not self:
            raise OptionsError("this conversation's KV cache was taken by a newer conversation; start a new chat()")
        if self.failed:
            raise OptionsError("an earlier turn of this conversation failed mid-generation; start a new chat() "
                               "(or reset() a stream session)")

    def send(self, audio=None, text: str | None = None, *, sampling: SamplingOptions | None = None,
             sampling_rate: int | None = None, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """Add a user turn, generate the answer (streamed through `on_text`), keep the cache."""
        self._check_usable()
        p = self.p
        if audio is None and not text:
            raise OptionsError("a turn needs audio, text, or both")
        p.prompt.check_user_text(text)
        opts = sampling or p.default_sampling()
        t0 = time.perf_counter()
        timings: dict = {"load_s": round(p.load_s, 4)}
        segments: list[np.ndarray] = []
        if audio is not None:
            wave = p.load_waveform(audio, sampling_rate)
            segments = split_segments(wave, p.mel.config)
            timings["audio_s"] = round(len(wave) / p.mel.config.sampling_rate, 3)
        counts = [num_audio_tokens(p.mel.valid_frames(len(s))) for s in segments]
        turn = self.begin_turn(text, len(segments), dry_run_counts=counts, reserve=opts.max_new_tokens)
        t = time.perf_counter()
        mels = [p.mel.log_mel(s) for s in segments]
        timings["mel_ms"] = round(1000 * (time.perf_counter() - t), 3)
        return self.finish_turn(turn, mels, sampling=opts, on_text=on_text, t0=t0, timings=timings)

    def _turn_ids(self, text: str | None, n_audio: int) -> tuple[dict, list[int]]:
        p = self.p
        message = user_message(n_audio, text)
        if not self.messages:
            turn_text = p.prompt.render([message], add_generation_prompt=True)
        else:
            turn_text = p.prompt.continuation(self.messages, message, self.ids[-1] if self.ids else None)
        return message, p.prompt.encode(turn_text)

    def _user_start(self, ids: list[int]) -> int:
        """Where the user message starts in a rendered turn: its `<|im_start|>` (the one before the
        assistant's); 0 without a ChatML template. What precedes it (the system turn, or the end of the
        previous answer) belongs to what came before."""
        im_start = self.p.prompt.token_id("<|im_start|>")
        starts = [i for i, t in enumerate(ids) if t == im_start] if im_start is not None else []
        return starts[-2] if len(starts) >= 2 else 0

    def _check_fits(self, n_new: int, audio_tokens: int) -> None:
        total = len(self.ids) + n_new
        if total >= self.p.max_context:
            raise LimitError(
                f"the prompt needs {total} positions (conversation {len(self.ids)}, this turn {n_new}, of which "
                f"{audio_tokens} audio tokens) but the context holds {self.p.max_context}; "
                "raise --max-context, shorten the audio, or start a new conversation"
                + ("" if self.context_policy == "drop_oldest" else " (or use the drop_oldest context policy)")
            )

    def _make_room(self, n_new: int, audio_tokens: int, reserve: int) -> None:
        """Apply the context policy for `n_new` more ids (+ `reserve` for the answer), then check the prompt fits."""
        excess = len(self.ids) + n_new + reserve + 1 - self.p.max_context
        if excess > 0 and self.context_policy == "drop_oldest":
            self._drop_oldest(excess)
        self._check_fits(n_new, audio_tokens)

    def _drop_oldest(self, excess: int) -> None:
        """Drop whole finished exchanges, oldest first, until `excess` positions are freed (or none is left),
        then re-prefill the kept conversation from position 0 (audio from the stored embeddings)."""
        finished = len(self._exchanges) - (1 if self._open else 0)
        if finished <= 0:
            return
        first = self._exchanges[0].start
        k = 0
        while k < finished:
            k += 1
            cut = self._exchanges[k].start if k < len(self._exchanges) else len(self.ids)
            if cut - first >= excess:
                break
        cut = self._exchanges[k].start if k < len(self._exchanges) else len(self.ids)
        removed = cut - first
        kept = self._exchanges[k:]
        for e in kept:
            e.start -= removed
            e.base = max(first, e.base - removed)
            if e.answer is not None:
                e.answer = (e.answer[0] - removed, e.answer[1] - removed)
        p = self.p
        self.failed = True  # until the cache holds the compacted conversation again
        # With nothing kept the next turn renders from scratch (system turn included): drop that too.
        self.ids = self.ids[:first] + self.ids[cut:] if kept else []
        self._exchanges = kept
        self.messages = self.messages[2 * k :]
        self.dropped_exchanges += k
        if self.ids:
            with torch.inference_mode():
                audio = [a for e in kept for a in e.audio]
                answers = [e.answer for e in kept if e.answer is not None]  # their audio ids are text, not slots
                p.decoder(embed_prompt(p.decoder, self.ids, audio, p.prompt.audio_token_id, text_spans=answers), 0, p.cache)
        self.cached = len(self.ids)
        self.failed = False

    def begin_turn(self, text: str | None, n_audio: int, *, dry_run_counts: list[int] | None = None,
                   reserve: int = 0, blockwise: bool = False) -> "PendingTurn":
        """Render the turn and prefill everything before its first audio slot (the shared prompt prefix).

        Streaming calls this before any audio arrives; `send` calls it too, so offline and streaming runs
        do the same arithmetic. With `dry_run_counts` (known audio token counts) the context policy is
        applied and an overflowing prompt is refused before any work. `blockwise`: the turn's one audio
        slot is filled block by block with `extend_audio` (chunked streaming).
        """
        self._check_usable()
        p = self.p
        p.prompt.check_user_text(text)
        if blockwise and n_audio != 1:
            raise OptionsError("a block-wise turn has exactly one audio slot")
        if self._open:  # an abandoned turn (e.g. refused as too long): roll its prefix back
            abandoned = self._exchanges.pop()
            self.ids = self.ids[: abandoned.base] if self.messages else []
            self.cached = min(self.cached, len(self.ids))
            self._open = False
        message, ids = self._turn_ids(text, n_audio)
        cut = ids.index(p.prompt.audio_token_id) if n_audio else 0
        dropped = self.dropped_exchanges
        if dry_run_counts is not None:
            self._make_room(len(p.prompt.expand_audio(ids, dry_run_counts)), sum(dry_run_counts), reserve)
        elif cut:
            self._make_room(cut, 0, reserve)
        if self.dropped_exchanges != dropped:  # the history changed under the rendered turn: render it again
            message, ids = self._turn_ids(text, n_audio)
            cut = ids.index(p.prompt.audio_token_id) if n_audio else 0
        self._exchanges.append(_Exchange(start=len(self.ids) + self._user_start(ids), base=len(self.ids)))
        self._open = True
        if cut:
            head = self.ids[self.cached :] + ids[:cut]
            self._check_fits(cut, 0)
            self.failed = True
            with torch.inference_mode():
                p.decoder(p.decoder.embed(torch.tensor([head], device=p.device)), self.cached, p.cache)
            self.ids = self.ids + ids[:cut]
            self.cached = len(self.ids)
            self.failed = False
        return PendingTurn(message=message, rest=ids[cut:], n_audio=n_audio, prefilled=cut, blockwise=blockwise)

    def extend_audio(self, turn: "PendingTurn", embeds: torch.Tensor, *, reserve: int = 0) -> "PendingTurn":
        """Prefill finished audio blocks [N, hidden] of a block-wise turn into the cache, committed.

        Returns the turn with `audio_done` advanced; later blocks and the rest of the prompt follow.
        """
        self._check_usable()
        p = self.p
        if not turn.blockwise:
            raise OptionsError("extend_audio needs a turn begun with blockwise=True")
        n = int(embeds.shape[0])
        if n == 0:
            return turn
        if not torch.isfinite(embeds).all():
            raise NumericalError("the audio encoder produced NaN/Inf (fp16 overflow?); rerun with --encoder-precision fp32")
        self._make_room(n, n, reserve)
        self.failed = True
        with torch.inference_mode():
            pending = self.ids[self.cached :]
            x = embeds.to(p.device, p.dtype)[None]
            if pending:
                x = torch.cat([p.decoder.embed(torch.tensor([pending], device=p.device)), x], dim=1)
            p.decoder(x, self.cached, p.cache)
        self.ids = self.ids + [p.prompt.audio_token_id] * n
        self.cached = len(self.ids)
        self._exchanges[-1].audio.append(embeds.to(p.device, p.dtype))
        self.failed = False
        return dataclasses.replace(turn, audio_done=turn.audio_done + n)

    def prefill_turn(self, turn: "PendingTurn", mels: list[tuple], *, reserve: int = 0) -> "PrefilledTurn":
        """Encode the turn's audio and prefill the rest of its prompt into the KV cache, without committing.

        The conversation's ids do not change: if the turn is abandoned (speech resumed after a speculative
        endpoint), the cache positions written here are simply overwritten later. (The context policy may
        compact the conversation first; that is a committed, valid state either way.) For a block-wise
        turn, `mels` are its remaining blocks.
        """
        self._check_usable()
        p = self.p
        counts = [m.tokens if isinstance(m, BlockBatch) else num_audio_tokens(m[1]) for m in mels]
        if turn.blockwise:
            slot_counts = [turn.audio_done + sum(counts)]
            new_ids = p.prompt.expand_audio(turn.rest, slot_counts)[turn.audio_done :]
        else:
            if len(mels) != turn.n_audio:
                raise OptionsError(f"the turn was begun with {turn.n_audio} audio segments but {len(mels)} were given")
            slot_counts = counts
            new_ids = p.prompt.expand_audio(turn.rest, counts)
        self._make_room(len(new_ids), sum(counts), reserve)
        pending = self.ids[self.cached :] + new_ids
        t = time.perf_counter()
        audio_embeds = [e for e in p.encode_mels(mels) if e.shape[0]]
        encoder_ms = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            audio = torch.cat(audio_embeds).to(p.device, p.dtype) if audio_embeds else None
            # Only this turn's new ids hold audio slots (what precedes them is cached, or the last answer's id).
            embeds = embed_prompt(p.decoder, pending, audio, p.prompt.audio_token_id,
                                  text_spans=[(0, len(pending) - len(new_ids))])
            logits = p.decoder(embeds, self.cached, p.cache)[0, -1]
        if not torch.isfinite(logits).all():
            raise NumericalError("the decoder produced NaN/Inf logits during prefill; rerun with --dtype fp32 or bf16")
        return PrefilledTurn(turn=turn, new_ids=new_ids, n_pending=len(pending), logits=logits, audio_tokens=sum(slot_counts),
                             start=self.cached, encoder_ms=encoder_ms, prefill_ms=1000 * (time.perf_counter() - t),
                             audio_embeds=audio)

    def finish_turn(self, turn: "PendingTurn", mels: list[tuple[torch.Tensor, int]] | None = None, *,
                    sampling: SamplingOptions | None = None, on_text: Callable[[str], None] | None = None,
                    t0: float | None = None, timings: dict | None = None, prefilled: "PrefilledTurn | None" = None,
                    should_stop: Callable[[], bool] | None = None) -> TurnResult:
        """Encode + prefill (unless `prefilled` already did, e.g. speculatively), then decode and commit.

        `should_stop` is polled before every decode step (barge-in): when it returns True the answer ends
        with finish_reason "cancelled"; what was generated so far stays in the conversation.
        """
        self._check_usable()
        p = self.p
        opts = sampling or p.default_sampling()
        t0 = time.perf_counter() if t0 is None else t0
        timings = {"load_s": round(p.load_s, 4)} if timings is None else timings
        if prefilled is None:
            prefilled = self.prefill_turn(turn, mels or [], reserve=opts.max_new_tokens)
            timings["speculative"] = False
        else:
            if prefilled.turn is not turn or prefilled.start != self.cached:
                raise OptionsError("the prefilled state belongs to another turn or an outdated cache position")
            timings["speculative"] = True
        timings["encoder_ms"] = round(prefilled.encoder_ms, 3)
        new_ids = prefilled.new_ids
        stats = GenerationStats()
        detok = IncrementalDetokenizer(p.prompt.tokenizer)
        pieces: list[str] = []
        history = self.ids + new_ids
        start = self.cached
        self.ids = history  # the prompt is in the cache once prefill ran; generated ids are appended by generate()
        if prefilled.audio_embeds is not None:
            self._exchanges[-1].audio.append(prefilled.audio_embeds)
        self.failed = True  # until the turn completes: a half-written cache must not be reused
        answer_from = len(history)
        stats.prefill_tokens, stats.prefill_s = prefilled.n_pending, prefilled.prefill_ms / 1000
        for token in generate(p.decoder, p.cache, None, start, history, opts, p.stop_ids, stats,
                              first_logits=prefilled.logits, prompt_len=prefilled.n_pending, should_stop=should_stop,
                              step=p.decode_step()):
            piece = detok.push(token)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        tail = detok.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        self.cached = len(self.ids) - 1  # the last generated id is fed at the start of the next turn
        if stats.finish_reason == "stop" and self.ids[-1] != p.prompt.token_id("<|im_end|>"):
            # A stop id that is not the template's end-of-turn (e.g. <|endoftext|>) is not part of the
            # conversation text: drop it so the next turn continues exactly as the template renders it.
            self.ids.pop()
        text_out = "".join(pieces)
        self._exchanges[-1].answer = (answer_from, len(self.ids))
        self.messages += [turn.message, {"role": "assistant", "content": text_out}]
        self._open = False
        self.failed = False
        timings.update(
            prefill_ms=round(1000 * stats.prefill_s, 3),
            prefill_tokens=stats.prefill_tokens + turn.prefilled,
            audio_tokens=prefilled.audio_tokens,
            ttft_ms=round(1000 * ((stats.first_token_s or time.perf_counter()) - t0), 3),
            decode_tokens=stats.decode_tokens,
            decode_tok_s=round(stats.decode_tokens / stats.decode_s, 3) if stats.decode_s > 0 and stats.decode_tokens else None,
            total_ms=round(1000 * (time.perf_counter() - t0), 3),
        )
        if turn.blockwise:
            timings["audio_tokens_prefilled_early"] = turn.audio_done  # blocks prefilled while the audio arrived
        if self.dropped_exchanges:
            timings["dropped_exchanges"] = self.dropped_exchanges
        return TurnResult(text=text_out, token_ids=list(stats.token_ids), finish_reason=stats.finish_reason, timings=timings)
