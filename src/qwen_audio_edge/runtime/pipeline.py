"""`Pipeline.from_artifacts(dir)`: the one public entry point of the lean runtime.

audio → audio.py (load, segment, log-mel) → encoder.py (ONNX Runtime or torch) → decoder.py (static KV
cache) → generate.py (sampling, stop, text streaming). `pipe.run()` answers one turn; `pipe.chat()` returns
a `Conversation` (conversation.py) that keeps the KV cache across turns; `pipe.stream()` a live session
(stream.py). `Conversation` and its turn types are re-exported here, where they used to live.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .artifacts import Artifacts, load_manifest
from .audio import MelConfig, MelFrontEnd, load_audio, num_audio_tokens, prepare_waveform, split_segments
from .block_encoder import BlockBatch, BlockCausalEncoder
from .conversation import CONTEXT_POLICIES, Conversation, PendingTurn, PrefilledTurn, TurnResult
from .decoder import KVCache, Qwen2Decoder, load_decoder
from .encoder import EncoderConfig, OnnxEncoder, TorchEncoder, load_encoder_module
from .errors import ArtifactsError, AudioError, LimitError, NumericalError, OptionsError
from .generate import SamplingOptions
from .generation_config import effective_generation_config, resolve_sampling, stop_token_ids
from .options import DTYPES, RuntimeOptions, decoder_load_kwargs, default_dtype
from .prompt import PromptFormat, user_message
from .quant_linear import Int8Linear
from .threads import apply_torch_threads, thread_budget

if TYPE_CHECKING:
    from .decode_graph import DecodeStep

__all__ = [
    "CONTEXT_POLICIES",
    "DTYPES",
    "Conversation",
    "PendingTurn",
    "Pipeline",
    "PrefilledTurn",
    "RuntimeOptions",
    "TurnResult",
]

# One encoder input of `Pipeline.encode_mels`: (mel [n_mels, T], valid frames[, position offset]) for the
# exact encoder, or a BlockBatch of the chunked stream mode's consecutive blocks.
MelInput = tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int] | BlockBatch


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
        self.dtype = DTYPES[options.dtype or default_dtype(options.device)]  # options.dtype is resolved already
        # one budget for torch and the ONNX Runtime encoder, by default the free cores (runtime/threads.py);
        # torch's pool is process-wide, by design: see RuntimeOptions
        self.threads = thread_budget(options.threads)
        apply_torch_threads(self.threads)
        m = artifacts.manifest
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.mel = MelFrontEnd(
            MelConfig.from_dict(m["preprocessor"]),
            load_file(str(artifacts.path(m["files_role"]["mel_filters"])))["mel_filters"].float(),
        )
        try:
            tokenizer = Tokenizer.from_file(str(artifacts.path(m["files_role"]["tokenizer"])))
        except Exception as e:
            raise ArtifactsError(f"tokenizer.json cannot be loaded: {e}; re-export") from e
        template_rel = m["files_role"].get("chat_template")
        template = artifacts.path(template_rel).read_text() if template_rel else None
        self.prompt = PromptFormat(tokenizer, template, artifacts.audio_token_id)
        # What transformers would use (generation_config.json, else derived from config.json): generation_config.py
        self.generation_config = effective_generation_config(
            m.get("generation_config"), m.get("source", {}).get("config")
        )
        self.stop_ids = stop_token_ids(self.generation_config, str(artifacts.root))
        self.encoder = self._load_encoder()
        self._block_module: tuple | None = None  # the torch encoder for chunked streaming, loaded on first use
        head = m.get("decoder", {}).get("lm_head_int8")
        self.decoder: Qwen2Decoder = load_decoder(
            artifacts.path(m["files_role"]["decoder_dir"]),
            self.dtype,
            self.device,
            lm_head_int8=artifacts.path(head) if head else None,
            **decoder_load_kwargs(options),
        )
        self.max_context = self._resolve_max_context()
        self.cache: KVCache = self.decoder.setup_cache(self.max_context)
        self._owner: object | None = None
        self._step: DecodeStep | None = None
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_artifacts(cls, path: str | Path, options: RuntimeOptions | None = None, **kwargs) -> Pipeline:
        """Verify the manifest (format version, files, sha256) and load everything onto `options.device`."""
        options = options or RuntimeOptions(**kwargs)
        return cls(load_manifest(path, verify_hashes=options.verify_hashes), options)

    def decode_step(self) -> DecodeStep | None:
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
                raise OptionsError(
                    f"no {precision} ONNX encoder in these artifacts (have {sorted(enc['onnx'])}); "
                    "re-export with --encoder-dtype fp16 or use --encoder-precision fp32"
                )
            onnx = OnnxEncoder(
                self.artifacts.path(enc["onnx"][precision]), threads=self.threads.threads, device=self.options.device
            )
            onnx.max_positions = int(self.artifacts.audio_config["max_source_positions"])
            return onnx
        from safetensors.torch import load_file

        cfg = EncoderConfig.from_dict(self.artifacts.audio_config, self.artifacts.text_config["hidden_size"])
        state = load_file(str(self.artifacts.path(enc["weights"])))
        dtype = (
            torch.float32 if self.device.type == "cpu" else (torch.float16 if precision == "fp16" else torch.float32)
        )
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
        per_token = args.kv_bytes_per_token(self.dtype, self.decoder.kv_storage)  # int8: with its scales
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

    def encode_mels(self, mels: Sequence[MelInput]) -> list[torch.Tensor]:
        """Encoder outputs [N_i, hidden] per input (see MelInput), checked finite."""
        out = []
        for item in mels:
            emb = item.encode() if isinstance(item, BlockBatch) else self.encoder(*item)
            if not torch.isfinite(emb).all():
                raise NumericalError(
                    "the audio encoder produced NaN/Inf (fp16 overflow?); rerun with --encoder-precision fp32"
                )
            out.append(emb)
        return out

    def single_turn(
        self,
        audio=None,
        text: str | None = None,
        sampling_rate: int | None = None,
        chunk_seconds: float | None = None,
        lookahead_seconds: float | None = None,
    ) -> tuple[list[int], torch.Tensor | None]:
        """Prompt ids and audio embeddings (concatenated, prompt order) of a one-turn conversation — no decoding.

        chunk_seconds: encode each segment with the chunked stream mode's block-causal rule (runtime/chunked.py,
        `lookahead_seconds` of look-ahead) instead of exactly; the ids are the same either way.
        """
        from .chunked import DEFAULT_LOOKAHEAD_S, block_frames, causal_utterance, lookahead_frames

        self.prompt.check_user_text(text)
        segments = (
            split_segments(self.load_waveform(audio, sampling_rate), self.mel.config) if audio is not None else []
        )
        counts = [num_audio_tokens(self.mel.valid_frames(len(s))) for s in segments]
        ids = self.prompt.expand_audio(
            self.prompt.encode(self.prompt.render([user_message(len(segments), text)])), counts
        )
        if chunk_seconds is None:
            embeds = self.encode_mels([self.mel.log_mel(s) for s in segments])
        else:
            block = block_frames(chunk_seconds, self.mel)
            ahead = lookahead_frames(DEFAULT_LOOKAHEAD_S if lookahead_seconds is None else lookahead_seconds, self.mel)
            embeds = self.encode_mels(
                [BlockBatch(self.block_encoder(), tuple(causal_utterance(self.mel, s, block, ahead))) for s in segments]
            )
        return ids, (torch.cat(embeds) if embeds else None)

    def stream(
        self,
        prompt: str | None = None,
        *,
        sampling: SamplingOptions | None = None,
        vad="default",
        on_text: Callable[[str], None] | None = None,
        options=None,
        on_event=None,
    ):
        """A streaming session (runtime/stream.py): feed PCM chunks, get turns at VAD endpoints or `end()`.

        vad: "default" (VadOptions()), a VadOptions, or None for push-to-talk only.
        options: a StreamOptions (mode exact|chunked, chunk_seconds, speculate, barge_in, context_policy).
        """
        from .stream import StreamOptions, StreamSession, VadOptions

        return StreamSession(
            self,
            prompt,
            sampling=sampling,
            vad=VadOptions() if vad == "default" else vad,
            on_text=on_text,
            options=options or StreamOptions(),
            on_event=on_event,
        )

    def chat(self, context_policy: str = "error") -> Conversation:
        """Start a conversation; it owns the KV cache until another conversation starts.

        context_policy: "error" (refuse a turn that does not fit in max_context) or "drop_oldest"
        (drop the oldest exchanges to make room); see `Conversation`.
        """
        return Conversation(self, context_policy)

    def run(
        self,
        audio=None,
        prompt: str | None = None,
        *,
        sampling: SamplingOptions | None = None,
        sampling_rate: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> TurnResult:
        """One user turn (audio and/or text) in a fresh conversation."""
        conv = Conversation(self, one_shot=True)
        return conv.send(audio, prompt, sampling=sampling, sampling_rate=sampling_rate, on_text=on_text)

    def active_paths(self) -> dict:
        """Which implementation runs each stage on this machine. Self-checked fast paths are decided on
        first use per shape class, so after a run this also says which path each shape class took
        (runtime/selfcheck.py); `run --json` prints it under "paths"."""
        enc, dec = self.encoder, self.decoder
        head = dec.lm_head
        if isinstance(head, Int8Linear):
            lm_head = (
                "int8: torch CPU op"
                if head._cpu_op and self.device.type == "cpu"
                else "int8: Triton GEMV (self-checked)"
            )
        else:
            lm_head = f"dense {self.options.dtype}"
        return {
            "device": str(self.device),
            "threads": self.threads.to_json(),
            "encoder": f"onnxruntime {enc.providers[0]}" if isinstance(enc, OnnxEncoder) else f"torch {enc.device}",
            "decoder_w4": list(getattr(dec, "w4_kernels", [])) or None,  # None: dense (fp16/fp32) decoder weights
            "fused_projections": int(getattr(dec, "fused_projections", 0)),
            "fused_kernels": bool(getattr(dec, "fused_kernels", False)),
            "lm_head": lm_head,
            "cuda_graphs": self.device.type == "cuda" and self.options.cuda_graphs,
            "self_check": dec.selfcheck.report(),
        }

    def default_sampling(self, **overrides) -> SamplingOptions:
        """The checkpoint's generation config with transformers' meaning for every key (absent: transformers'
        default; keys we do not implement, when active: OptionsError), then `overrides` (SamplingOptions
        fields, None = not given). What every run without explicit `sampling=` uses; see generation_config.py."""
        return resolve_sampling(self.generation_config, str(self.artifacts.root), **overrides)
