"""Audio encoder + projector: the one lean torch definition (exported to ONNX) and the two backends.

`AudioEncoderWithProjector` is built from the artifacts' audio config; its parameter names are the
checkpoint's (`audio_tower.*`, `multi_modal_projector.*`). It takes only the frames an utterance needs —
mel [1, n_mels, T] with T = min(L + 2, 3000) — plus the valid frame count L, and returns one embedding
per audio token. Transformers pads every input to 3000 frames and masks padded keys; the valid
positions after conv2 ((L − 1)//2 + 1 of them) see only each other there, so running the transformer
on exactly those positions is the same computation at a fraction of the cost (docs/architecture.md).

Backends: `OnnxEncoder` runs the exported file with ONNX Runtime (default); `TorchEncoder` runs the
module directly (for GPUs without onnxruntime-gpu). Both expose
`__call__(mel, n_valid, pos_offset=0) -> [N, hidden]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArtifactsError, AudioError
from .selfcheck import warn_once
from .threads import ort_session_options, thread_budget


@dataclass(frozen=True)
class EncoderConfig:
    """Audio tower + projector dimensions, from the checkpoint's `audio_config` and text hidden size."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    max_source_positions: int
    output_dim: int  # text hidden size (projector output)
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @classmethod
    def from_dict(cls, audio_config: dict, text_hidden_size: int) -> EncoderConfig:
        return cls(
            num_mel_bins=int(audio_config["num_mel_bins"]),
            d_model=int(audio_config["d_model"]),
            encoder_layers=int(audio_config["encoder_layers"]),
            encoder_attention_heads=int(audio_config["encoder_attention_heads"]),
            encoder_ffn_dim=int(audio_config["encoder_ffn_dim"]),
            max_source_positions=int(audio_config["max_source_positions"]),
            output_dim=int(text_hidden_size),
            activation_function=str(audio_config.get("activation_function", "gelu")),
            scale_embedding=bool(audio_config.get("scale_embedding", False)),
        )

    @property
    def max_frames(self) -> int:
        """Mel frames of one full window (conv2 halves them to max_source_positions)."""
        return 2 * self.max_source_positions


class _SelfAttention(nn.Module):
    """The attention projections under the checkpoint's names (`self_attn.q_proj`, …); the arithmetic is
    in `_EncoderLayer.forward` (and `block_encoder.tower_block`, which adds the block-causal cache)."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)


class _Projector(nn.Module):
    """`multi_modal_projector.linear`: audio states [.., d_model] → the decoder's hidden size."""

    def __init__(self, d_model: int, output_dim: int):
        super().__init__()
        self.linear = nn.Linear(d_model, output_dim)


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.encoder_attention_heads
        self.self_attn = _SelfAttention(d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.self_attn_layer_norm(x)
        a = self.self_attn
        q = a.q_proj(h).view(b, t, self.n_heads, -1).transpose(1, 2)
        k = a.k_proj(h).view(b, t, self.n_heads, -1).transpose(1, 2)
        v = a.v_proj(h).view(b, t, self.n_heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + a.out_proj(o.transpose(1, 2).reshape(b, t, d))
        h = self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = x + h
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class _AudioTower(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.d_model)
        self.layers = nn.ModuleList([_EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.layer_norm = nn.LayerNorm(cfg.d_model)


class AudioEncoderWithProjector(nn.Module):
    """mel [1, n_mels, T] + valid frames L [1] (int64) (+ pos_offset [1] int64) → audio embeddings [1, N, output_dim].

    T must be min(L + 2, 2·max_source_positions): the two frames past the valid ones feed the
    boundary convolutions exactly as in the padded reference. N = num_audio_tokens(L). pos_offset (the
    chunked stream mode's block position, in conv2 steps) shifts the learned positions; T/2 + pos_offset
    must not exceed max_source_positions.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.activation_function != "gelu":
            raise ArtifactsError(f"audio encoder activation {cfg.activation_function!r} is not supported (gelu only)")
        self.config = cfg
        self.audio_tower = _AudioTower(cfg)
        self.multi_modal_projector = _Projector(cfg.d_model, cfg.output_dim)

    def forward(self, mel: torch.Tensor, n_valid: torch.Tensor, pos_offset: torch.Tensor | None = None) -> torch.Tensor:
        tower = self.audio_tower
        x = F.gelu(tower.conv1(mel.to(tower.conv1.weight.dtype)))
        x = F.gelu(tower.conv2(x)).transpose(1, 2)  # [1, T2, d]
        # Keep the valid positions after conv2, (L - 1) // 2 + 1 of them, all of which are attention keys
        # in the reference (the pool later drops an odd last one). A tensor-valued slice keeps ONNX dynamic.
        n_pos = (n_valid.reshape(()) - 1) // 2 + 1
        # Learned positions start at `pos_offset` (0 for a whole utterance; a chunked-mode block keeps its
        # place in the utterance, measured far closer to exact mode than restarting at 0 per block).
        positions = torch.arange(x.shape[1], device=x.device)
        if pos_offset is not None:
            positions = positions + pos_offset.reshape(())
        x = x + tower.embed_positions.weight.index_select(0, positions).to(x.dtype)
        x = _take_prefix(x, n_pos)
        for layer in tower.layers:
            x = layer(x)
        x = tower.layer_norm(pool_pairs(x))
        return self.multi_modal_projector.linear(x)


def pool_pairs(x: torch.Tensor) -> torch.Tensor:
    """Mean of consecutive position pairs, [B, T, d] → [B, T // 2, d]; an odd last position is dropped.

    Bit-identical to Whisper's `avg_pool1d(kernel_size=2, stride=2)` (pair sum, then /2), written with
    index_select because torch 2.11's ONNX exporter refuses avg_pool1d on a data-dependent length
    (it guards on the length's parity); this form exports under torch 2.11 and 2.13 alike.
    """
    even = torch.arange(x.shape[1] // 2, device=x.device) * 2
    return (x.index_select(1, even) + x.index_select(1, even + 1)) / 2


def _take_prefix(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x[:, :n] for a 0-d integer tensor n, written with index_select so it exports with dynamic n."""
    idx = torch.arange(x.shape[1], device=x.device)
    idx = idx[idx < n]
    return x.index_select(1, idx)


def load_encoder_module(
    cfg: EncoderConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> AudioEncoderWithProjector:
    """Build the module on the meta device and assign the weights (no random init, no extra copy)."""
    with torch.device("meta"):
        module = AudioEncoderWithProjector(cfg)
    expected = set(module.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ArtifactsError(
            f"encoder weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True)
    return module.eval()


class TorchEncoder:
    """Runs `AudioEncoderWithProjector` in torch on any device (the GPU path without onnxruntime-gpu)."""

    name = "torch"

    def __init__(self, module: AudioEncoderWithProjector, device: torch.device):
        self.module = module.to(device)
        self.device = device
        self.dtype = next(module.parameters()).dtype

    supports_pos_offset = True

    @torch.inference_mode()
    def __call__(self, mel: torch.Tensor, n_valid: int, pos_offset: int = 0) -> torch.Tensor:
        m = mel.to(self.device, self.dtype).unsqueeze(0)
        check_positions(mel.shape[-1], pos_offset, self.module.config.max_source_positions)
        out = self.module(
            m,
            torch.tensor([n_valid], dtype=torch.int64, device=self.device),
            torch.tensor([pos_offset], dtype=torch.int64, device=self.device),
        )
        return out[0]


def check_positions(frames: int, pos_offset: int, max_positions: int) -> None:
    """A block must fit in the encoder's learned positions (a clear error instead of an index error)."""
    if pos_offset < 0 or (frames + 1) // 2 + pos_offset > max_positions:
        raise AudioError(
            f"encoder input of {frames} frames at position offset {pos_offset} exceeds the "
            f"{max_positions} learned positions (one 30 s window); end the utterance sooner"
        )


def cuda_available() -> bool:
    """A real GPU, detected through torch: onnxruntime-gpu lists CUDA providers even with no GPU."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


class OnnxEncoder:
    """ONNX Runtime session over the exported encoder (CPU EP; CUDA EP when it is real and a GPU exists)."""

    name = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        # the pipeline's thread budget (runtime/threads.py: shared with torch, no spin-waiting)
        opts = ort_session_options(threads or thread_budget(None).threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if device.startswith("cuda") and cuda_available() and "CUDAExecutionProvider" in ort.get_available_providers():
            index = torch.device(device).index or 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:
            raise ArtifactsError(f"ONNX Runtime cannot load {Path(path).name}: {e}; re-export") from e
        self.providers = self.session.get_providers()
        if device.startswith("cuda") and self.providers[0] != "CUDAExecutionProvider":
            why = (
                "no CUDA GPU is visible"
                if not cuda_available()
                else "this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu, i.e. the [gpu] "
                "extra instead of [cpu])"
            )
            warn_once(
                "onnx/cpu-ep",
                f"--device {device}: the ONNX encoder runs on the CPU because {why}; "
                "--encoder-backend torch runs it on the GPU instead",
            )
        inputs = {i.name: i for i in self.session.get_inputs()}
        # Exports before the chunked stream mode have no pos_offset input; they serve exact mode only.
        if set(inputs) not in ({"mel", "n_valid"}, {"mel", "n_valid", "pos_offset"}):
            raise ArtifactsError(
                f"{path}: expected encoder inputs mel, n_valid (and pos_offset), found {sorted(inputs)}"
            )
        self.supports_pos_offset = "pos_offset" in inputs
        self._mel_dtype = np.float16 if inputs["mel"].type == "tensor(float16)" else np.float32
        self.max_positions: int | None = None  # set by the pipeline from the audio config

    def __call__(self, mel: torch.Tensor, n_valid: int, pos_offset: int = 0) -> torch.Tensor:
        feeds = {
            "mel": mel.detach().cpu().numpy().astype(self._mel_dtype)[None],
            "n_valid": np.array([n_valid], dtype=np.int64),
        }
        if self.supports_pos_offset:
            if self.max_positions is not None:
                check_positions(mel.shape[-1], pos_offset, self.max_positions)
            feeds["pos_offset"] = np.array([pos_offset], dtype=np.int64)
        elif pos_offset:
            raise ArtifactsError(
                "this encoder.onnx was exported before the chunked stream mode (no pos_offset input); "
                "re-export the checkpoint with this version to use --stream-mode chunked"
            )
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out[0].astype(np.float32, copy=False))
