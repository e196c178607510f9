"""`Pipeline.from_artifacts(dir)`: the one public entry point of the lean runtime.

audio → audio.py (load, segment, log-mel) → encoder.py (ONNX Runtime or torch) → decoder.py (static KV
cache) → generate.py (sampling, stop, text streaming). A `Conversation` keeps the KV cache across turns:
a new turn prefills only the ids not yet in the cache, so turn N costs its own tokens, not the history.
"""

from __future__ import annotations

import json
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
from .encoder import EncoderConfig, OnnxEncoder, TorchEncoder, load_encoder_module
from .errors import ArtifactsError, AudioError, LimitError, NumericalError, OptionsError
from .generate import GenerationStats, IncrementalDetokenizer, SamplingOptions, generate
from .prompt import PromptFormat, user_message

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
        self.generation_config = m.get("generation_config") or {}
        self.stop_ids = self._stop_ids()
        self.encoder = self._load_encoder()
        head = m.get("decoder", {}).get("lm_head_int8")
        self.decoder: Qwen2Decoder = load_decoder(artifacts.path(m["files_role"]["decoder_dir"]), self.dtype, self.device,
                                                  lm_head_int8=artifacts.path(head) if head else None,
                                                  w4_kernel=options.w4_kernel)
        self.max_context = self._resolve_max_context()
        self.cache: KVCache = self.decoder.setup_cache(self.max_context)
        self._owner: object | None = None
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_artifacts(cls, path: str | Path, options: RuntimeOptions | None = None, **kwargs) -> "Pipeline":
        """Verify the manifest (format version, files, sha256) and load everything onto `options.device`."""
        options = options or RuntimeOptions(**kwargs)
        return cls(load_manifest(path, verify_hashes=options.verify_hashes), options)

    # --- loading helpers -------------------------------------------------------------------------
    def _stop_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.prompt.token_id(tok)
            if tid is not None:
                ids.add(tid)
        return sorted(ids)

    def _load_encoder(self):
        m = self.artifacts.manifest
        enc = m["encoder"]
        precision = self.options.encoder_precision or enc["default"]
        if self.options.encoder_backend == "onnx":
            if precision not in enc["onnx"]:
                raise OptionsError(f"no {precision} ONNX encoder in these artifacts (have {sorted(enc['onnx'])}); "
                                   "re-export with --encoder-dtype fp16 or use --encoder-precision fp32")
            return OnnxEncoder(self.artifacts.path(enc["onnx"][precision]), threads=self.options.threads, device=self.options.device)
        from safetensors.torch import load_file

        cfg = EncoderConfig.from_dict(self.artifacts.audio_config, self.artifacts.text_config["hidden_size"])
        state = load_file(str(self.artifacts.path(enc["weights"])))
        dtype = torch.float32 if self.device.type == "cpu" else (torch.float16 if precision == "fp16" else torch.float32)
        return TorchEncoder(load_encoder_module(cfg, state, dtype), self.device)

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

    def encode_mels(self, mels: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Encoder outputs [N_i, hidden] per (mel, valid frames) segment, checked finite."""
        out = []
        for mel, n_valid in mels:
            emb = self.encoder(mel, n_valid)
            if not torch.isfinite(emb).all():
                raise NumericalError("the audio encoder produced NaN/Inf (fp16 overflow?); rerun with --encoder-precision fp32")
            out.append(emb)
        return out

    def single_turn(self, audio=None, text: str | None = None, sampling_rate: int | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Prompt ids and audio embeddings (concatenated, prompt order) of a one-turn conversation — no decoding."""
        self.prompt.check_user_text(text)
        segments = split_segments(self.load_waveform(audio, sampling_rate), self.mel.config) if audio is not None else []
        counts = [num_audio_tokens(self.mel.valid_frames(len(s))) for s in segments]
        ids = self.prompt.expand_audio(self.prompt.encode(self.prompt.render([user_message(len(segments), text)])), counts)
        embeds = self.encode_mels([self.mel.log_mel(s) for s in segments])
        return ids, (torch.cat(embeds) if embeds else None)

    def stream(self, prompt: str | None = None, *, sampling: SamplingOptions | None = None, vad="default",
               on_text: Callable[[str], None] | None = None):
        """A streaming session (runtime/stream.py): feed PCM chunks, get turns at VAD endpoints or `end()`.

        vad: "default" (VadOptions()), a VadOptions, or None for push-to-talk only.
        """
        from .stream import StreamSession, VadOptions

        return StreamSession(self, prompt, sampling=sampling, vad=VadOptions() if vad == "default" else vad, on_text=on_text)

    def chat(self) -> "Conversation":
        """Start a conversation; it owns the KV cache until another conversation starts."""
        return Conversation(self)

    def run(self, audio=None, prompt: str | None = None, *, sampling: SamplingOptions | None = None,
            sampling_rate: int | None = None, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """One user turn (audio and/or text) in a fresh conversation."""
        return self.chat().send(audio, prompt, sampling=sampling, sampling_rate=sampling_rate, on_text=on_text)

    def default_sampling(self, **overrides) -> SamplingOptions:
        return SamplingOptions.from_generation_config(self.generation_config, **overrides)


class Conversation:
    """A multi-turn chat whose KV cache is kept between turns (text-only turns included)."""

    def __init__(self, pipeline: Pipeline):
        self.p = pipeline
        pipeline._owner = self
        self.messages: list[dict] = []
        self.ids: list[int] = []  # every id of the conversation, as fed or generated
        self.cached = 0  # ids[:cached] are in the KV cache
        self.failed = False

    def _check_usable(self) -> None:
        if self.p._owner is not self:
            raise OptionsError("this conversation's KV cache was taken by a newer conversation; start a new chat()")
        if self.failed:
            raise OptionsError("an earlier turn of this conversation failed mid-generation; start a new chat()")

    def send(self, audio=None, text: str | None = None, *, sampling: SamplingOptions | None = None,
             sampling_rate: int | None = None, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """Add a user turn, generate the answer (streamed through `on_text`), keep the cache."""
        self._check_usable()
        p = self.p
        if audio is None and not text:
            raise OptionsError("a turn needs audio, text, or both")
        p.prompt.check_user_text(text)
        t0 = time.perf_counter()
        timings: dict = {"load_s": round(p.load_s, 4)}
        segments: list[np.ndarray] = []
        if audio is not None:
            wave = p.load_waveform(audio, sampling_rate)
            segments = split_segments(wave, p.mel.config)
            timings["audio_s"] = round(len(wave) / p.mel.config.sampling_rate, 3)
        counts = [num_audio_tokens(p.mel.valid_frames(len(s))) for s in segments]
        turn = self.begin_turn(text, len(segments), dry_run_counts=counts)
        t = time.perf_counter()
        mels = [p.mel.log_mel(s) for s in segments]
        timings["mel_ms"] = round(1000 * (time.perf_counter() - t), 3)
        return self.finish_turn(turn, mels, sampling=sampling, on_text=on_text, t0=t0, timings=timings)

    def _turn_ids(self, text: str | None, n_audio: int) -> tuple[dict, list[int]]:
        p = self.p
        message = user_message(n_audio, text)
        if not self.messages:
            turn_text = p.prompt.render([message], add_generation_prompt=True)
        else:
            turn_text = p.prompt.continuation(self.messages, message, self.ids[-1] if self.ids else None)
        return message, p.prompt.encode(turn_text)

    def _check_fits(self, n_new: int, audio_tokens: int) -> None:
        total = len(self.ids) + n_new
        if total >= self.p.max_context:
            raise LimitError(
                f"the prompt needs {total} positions (conversation {len(self.ids)}, this turn {n_new}, of which "
                f"{audio_tokens} audio tokens) but the context holds {self.p.max_context}; "
                "raise --max-context, shorten the audio, or start a new conversation"
            )

    def begin_turn(self, text: str | None, n_audio: int, *, dry_run_counts: list[int] | None = None) -> "PendingTurn":
        """Render the turn and prefill everything before its first audio slot (the shared prompt prefix).

        Streaming calls this before any audio arrives; `send` calls it too, so offline and streaming runs
        do the same arithmetic. With `dry_run_counts` (known audio token counts) an overflowing prompt is
        refused before any work.
        """
        self._check_usable()
        p = self.p
        p.prompt.check_user_text(text)
        message, ids = self._turn_ids(text, n_audio)
        if dry_run_counts is not None:
            self._check_fits(len(p.prompt.expand_audio(ids, dry_run_counts)), sum(dry_run_counts))
        cut = ids.index(p.prompt.audio_token_id) if n_audio else 0
        if cut:
            head = self.ids[self.cached :] + ids[:cut]
            self._check_fits(cut, 0)
            self.failed = True
            with torch.inference_mode():
                p.decoder(p.decoder.embed(torch.tensor([head], device=p.device)), self.cached, p.cache)
            self.ids = self.ids + ids[:cut]
            self.cached = len(self.ids)
            self.failed = False
        return PendingTurn(message=message, rest=ids[cut:], n_audio=n_audio, prefilled=cut)

    def prefill_turn(self, turn: "PendingTurn", mels: list[tuple[torch.Tensor, int]]) -> "PrefilledTurn":
        """Encode the turn's audio and prefill the rest of its prompt into the KV cache, without committing.

        The conversation's state does not change: if the turn is abandoned (speech resumed after a
        speculative endpoint), the cache positions written here are simply overwritten later.
        """
        self._check_usable()
        p = self.p
        if len(mels) != turn.n_audio:
            raise OptionsError(f"the turn was begun with {turn.n_audio} audio segments but {len(mels)} were given")
        counts = [num_audio_tokens(n_valid) for _, n_valid in mels]
        new_ids = p.prompt.expand_audio(turn.rest, counts)
        pending = self.ids[self.cached :] + new_ids
        self._check_fits(len(new_ids), sum(counts))
        t = time.perf_counter()
        audio_embeds = p.encode_mels(mels)
        encoder_ms = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            ids_t = torch.tensor([pending], dtype=torch.long, device=p.device)
            embeds = p.decoder.embed(ids_t)
            if audio_embeds:
                mask = ids_t[0] == p.prompt.audio_token_id
                # Only this turn's new ids hold audio slots (earlier audio ids are already cached).
                mask[: len(pending) - len(new_ids)] = False
                embeds[0, mask] = torch.cat(audio_embeds).to(p.device, embeds.dtype)
            logits = p.decoder(embeds, self.cached, p.cache)[0, -1]
        if not torch.isfinite(logits).all():
            raise NumericalError("the decoder produced NaN/Inf logits during prefill; rerun with --dtype fp32 or bf16")
        return PrefilledTurn(turn=turn, new_ids=new_ids, n_pending=len(pending), logits=logits, audio_tokens=sum(counts),
                             start=self.cached, encoder_ms=encoder_ms, prefill_ms=1000 * (time.perf_counter() - t))

    def finish_turn(self, turn: "PendingTurn", mels: list[tuple[torch.Tensor, int]] | None = None, *,
                    sampling: SamplingOptions | None = None, on_text: Callable[[str], None] | None = None,
                    t0: float | None = None, timings: dict | None = None, prefilled: "PrefilledTurn | None" = None) -> TurnResult:
        """Encode + prefill (unless `prefilled` already did, e.g. speculatively), then decode and commit."""
        self._check_usable()
        p = self.p
        opts = sampling or p.default_sampling()
        t0 = time.perf_counter() if t0 is None else t0
        timings = {"load_s": round(p.load_s, 4)} if timings is None else timings
        if prefilled is None:
            prefilled = self.prefill_turn(turn, mels or [])
            timings["speculative"] = False
        else:
            if prefilled.turn is not turn or prefilled.start != self.cached:
                raise OptionsError("the prefilled state belongs to another turn or an outdated cache position")
            timings["speculative"] = True
        timings["encoder_ms"] = round(prefilled.encoder_ms, 3)
        new_ids, counts = prefilled.new_ids, [prefilled.audio_tokens]
        stats = GenerationStats()
        detok = IncrementalDetokenizer(p.prompt.tokenizer)
        pieces: list[str] = []
        history = self.ids + new_ids
        start = self.cached
        self.ids = history  # the prompt is in the cache once prefill ran; generated ids are appended by generate()
        self.failed = True  # until the turn completes: a half-written cache must not be reused
        stats.prefill_tokens, stats.prefill_s = prefilled.n_pending, prefilled.prefill_ms / 1000
        for token in generate(p.decoder, p.cache, None, start, history, opts, p.stop_ids, stats,
                              first_logits=prefilled.logits, prompt_len=prefilled.n_pending):
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
        self.messages += [turn.message, {"role": "assistant", "content": text_out}]
        self.failed = False
        timings.update(
            prefill_ms=round(1000 * stats.prefill_s, 3),
            prefill_tokens=stats.prefill_tokens + turn.prefilled,
            audio_tokens=sum(counts),
            ttft_ms=round(1000 * ((stats.first_token_s or time.perf_counter()) - t0), 3),
            decode_tokens=stats.decode_tokens,
            decode_tok_s=round(stats.decode_tokens / stats.decode_s, 3) if stats.decode_s > 0 and stats.decode_tokens else None,
            total_ms=round(1000 * (time.perf_counter() - t0), 3),
        )
        return TurnResult(text=text_out, token_ids=list(stats.token_ids), finish_reason=stats.finish_reason, timings=timings)
