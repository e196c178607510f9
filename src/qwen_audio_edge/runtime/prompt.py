"""Prompt building: the checkpoint's chat template rendered as transformers does, tokenized, audio expanded.

Rendering uses jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks (transformers'
settings). Each `<|AUDIO|>` placeholder is then expanded to one id per audio embedding, which is what
`Qwen2AudioProcessor` does to the text before tokenizing; `<|AUDIO|>` is a special token, so expanding
ids after tokenizing gives the same ids. A base checkpoint without a template uses the raw form
`<|audio_bos|><|AUDIO|><|audio_eos|>{text}`.

`embed_prompt` / `place_audio` then turn expanded ids into the decoder's input: token embeddings, with the
audio embeddings written over the `<|AUDIO|>` slots in order (what the Qwen2-Audio model does inside its
forward). Every caller — a turn's prefill, the context policy's re-prefill, compare, tests — goes
through them, so the slot rule (and its one exception, generated text that holds the audio id) is kept
in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from .errors import ArtifactsError, OptionsError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from .decoder import Qwen2Decoder

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
_SENTINEL = "\u0000QAE-ASSISTANT-TURN\u0000"


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def user_message(n_audio: int, text: str | None) -> dict:
    """One user turn: the audio slots first, then the text (the processor's documented message form)."""
    content: list[dict] = [{"type": "audio", "audio": f"audio-{i + 1}"} for i in range(n_audio)]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


@dataclass(frozen=True)
class PromptFormat:
    """Tokenizer + template + the special ids the runtime needs."""

    tokenizer: Tokenizer
    chat_template: str | None
    audio_token_id: int

    @cached_property
    def _template(self):
        return _compile_template(self.chat_template) if self.chat_template else None

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Conversation → prompt text (template form), or the raw base-model form without a template."""
        if self._template is not None:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        parts = []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                parts.append(content)
                continue
            for c in content:
                if c.get("type") == "audio":
                    parts.append(AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS)
                elif c.get("type") == "text":
                    parts.append(c["text"])
        return "".join(parts)

    def check_user_text(self, text: str | None) -> None:
        """User text must not smuggle special tokens (<|AUDIO|>, <|im_end|>, …): they would break the turn."""
        if not text:
            return
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        found = sorted({t for t in specials if t in text})
        if found:
            raise OptionsError(f"the prompt text contains special token(s) {', '.join(found)}; remove them")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def continuation(self, history: list[dict], new_message: dict, last_id: int | None) -> str:
        """Text that follows an assistant answer already in the cache, up to the next answer's start.

        Rendered with a sentinel assistant turn so that whatever the template writes after an answer
        (`<|im_end|>\\n<|im_start|>user\\n…<|im_start|>assistant\\n`) is taken verbatim; if the answer
        already ended with the template's end-of-turn token, that token is not repeated.
        """
        if self._template is None:
            return self.render([new_message])
        msgs = history + [{"role": "assistant", "content": _SENTINEL}, new_message]
        text = self.render(msgs, add_generation_prompt=True)
        if _SENTINEL not in text:
            raise ArtifactsError("the chat template drops assistant turns; multi-turn chat cannot reuse the cache")
        tail = text.split(_SENTINEL, 1)[1]
        end_token = "<|im_end|>"
        if last_id is not None and self.token_id(end_token) == last_id and tail.startswith(end_token):
            tail = tail[len(end_token) :]
        return tail

    def turn_ids(self, history: list[dict], message: dict, last_id: int | None) -> list[int]:
        """Ids of a new user turn `message` up to where its answer starts: the whole rendered prompt when
        `history` (earlier messages) is empty, else the continuation after the last answer, whose final
        id `last_id` is already in the conversation."""
        if not history:
            return self.encode(self.render([message], add_generation_prompt=True))
        return self.encode(self.continuation(history, message, last_id))

    def user_start(self, ids: list[int]) -> int:
        """Where the user message starts in a rendered turn's ids: its `<|im_start|>` (the one before the
        assistant's); 0 without a ChatML template. What precedes it (the system turn, or the end of the
        previous answer) belongs to what came before."""
        im_start = self.token_id("<|im_start|>")
        starts = [i for i, t in enumerate(ids) if t == im_start] if im_start is not None else []
        return starts[-2] if len(starts) >= 2 else 0

    def expand_audio(self, ids: list[int], audio_tokens: list[int]) -> list[int]:
        """Replace the k-th `<|AUDIO|>` id by `audio_tokens[k]` copies; counts must match."""
        slots = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if len(slots) != len(audio_tokens):
            raise ArtifactsError(
                f"the chat template produced {len(slots)} audio slots for {len(audio_tokens)} audio segments; "
                "the template does not render audio entries as <|audio_bos|><|AUDIO|><|audio_eos|>"
            )
        out: list[int] = []
        k = 0
        for t in ids:
            if t == self.audio_token_id:
                out.extend([t] * audio_tokens[k])
                k += 1
            else:
                out.append(t)
        return out


def audio_slots(ids: Sequence[int], audio_token_id: int, text_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Positions of `ids` that are audio slots: every `<|AUDIO|>` id outside the [from, to) `text_spans`.

    A text span is generated text (an answer may contain the audio token id itself; it is then a token
    like any other, not a slot) or ids whose slots were filled earlier (already in the KV cache).
    """
    excluded: set[int] = set()
    for a, b in text_spans:
        excluded.update(range(a, b))
    return [i for i, t in enumerate(ids) if t == audio_token_id and i not in excluded]


def place_audio(
    embeds: torch.Tensor,
    ids: Sequence[int],
    audio: torch.Tensor | Sequence[torch.Tensor] | None,
    audio_token_id: int,
    *,
    text_spans: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """Write the audio embeddings [N, hidden] (or a list of them, concatenated in prompt order) over the N
    audio slots of `ids` in `embeds` ([S, hidden] or [1, S, hidden], the ids' token embeddings), in place;
    returns `embeds`. The audio is cast to the embeddings' dtype and device.

    The slots are found on the host from the id list (no device sync). OptionsError when the number of
    slots and of audio embeddings differ: the ids must hold one slot per embedding (expand_audio).
    """
    import torch

    if audio is not None and not isinstance(audio, torch.Tensor):
        audio = torch.cat(list(audio)) if len(audio) else None
    n_audio = 0 if audio is None else int(audio.shape[0])
    slots = audio_slots(list(ids), audio_token_id, text_spans)
    if len(slots) != n_audio:
        raise OptionsError(
            f"the prompt ids hold {len(slots)} audio slots but {n_audio} audio embeddings were given; "
            "expand each <|AUDIO|> to its segment's token count first (PromptFormat.expand_audio)"
        )
    if audio is not None and n_audio:
        rows = embeds[0] if embeds.dim() == 3 else embeds
        rows[torch.tensor(slots, device=embeds.device)] = audio.to(embeds.device, embeds.dtype)
    return embeds


def embed_prompt(
    decoder: Qwen2Decoder,
    ids: Sequence[int],
    audio: torch.Tensor | Sequence[torch.Tensor] | None,
    audio_token_id: int,
    *,
    text_spans: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """The decoder's input for `ids`: their token embeddings [1, S, hidden] on the decoder's device, with
    `audio` in the audio slots (see place_audio; `text_spans` are ranges whose audio ids are not slots)."""
    import torch

    t = torch.tensor([list(ids)], dtype=torch.long, device=decoder.model.embed_tokens.weight.device)
    return place_audio(decoder.embed(t), ids, audio, audio_token_id, text_spans=text_spans)
