"""`Conversation`: a multi-turn chat that keeps its KV cache between turns (`pipeline.chat()`).

A turn goes through up to four steps, so that streaming can do the early ones while the person still
speaks and the offline `send` does them back to back with the same arithmetic:

1. `begin_turn`: render the turn with the chat template; prefill everything before its first audio slot
   (the system turn on the first turn, the end of the last answer and the user turn's header after) —
   streaming only: the offline `send` defers it into step 3's one prefill pass.
2. `extend_audio` (chunked streaming only): prefill finished audio blocks as they arrive, committed.
3. `prefill_turn`: encode the (remaining) audio and prefill the rest of the prompt, not yet committed
   (speculation may run it at a tentative endpoint and throw it away when speech resumes).
4. `finish_turn`: decode the answer into the cache and commit the turn.

A new turn prefills only the ids not yet in the cache, so turn N costs its own tokens, not the history.
Where a turn does not fit, the conversation's `ContextPolicy` (runtime/context_policy.py) refuses it or
names the oldest exchanges to drop; dropping rewrites the ids and re-prefills them here.

Two classes split the work: `Conversation` is the turn protocol above (check the input, encode the
audio, time the stages, hand out the turn records), and its `CacheLedger` is what the KV cache holds —
the messages and ids, which ids are cached, the context policy's exchanges — with every write into the
cache (a turn's prefix, audio blocks, prompt, answer, the re-prefill after a drop), so that cache
positions are tracked in one place.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .audio import num_audio_tokens, split_segments
from .block_encoder import BlockBatch
from .context_policy import CONTEXT_POLICIES, ContextPolicy, Drop
from .errors import NumericalError, OptionsError
from .generate import GenerationStats, IncrementalDetokenizer, SamplingOptions, generate
from .prompt import embed_prompt, user_message

if TYPE_CHECKING:
    from .pipeline import MelInput, Pipeline
    from .prompt import PromptFormat

__all__ = ["CONTEXT_POLICIES", "CacheLedger", "Conversation", "PendingTurn", "PrefilledTurn", "TurnResult"]


@dataclass(frozen=True)
class PendingTurn:
    """A user turn whose prompt prefix (up to its first audio slot) is already in the KV cache — or, begun with
    `defer_prefix` (offline `send`), none of it: then `rest` is the whole turn and `prefilled` 0."""

    message: dict
    rest: list[int]  # the turn's remaining ids, audio slots not yet expanded
    n_audio: int
    prefilled: int  # ids of this turn prefilled by begin_turn
    blockwise: bool = False  # one audio slot filled block by block (chunked streaming): every mel belongs to it
    audio_done: int = 0  # audio tokens of that slot already prefilled by extend_audio

    def remaining_ids(self, prompt: PromptFormat, counts: list[int]) -> tuple[list[int], int]:
        """The ids still to prefill, audio slots expanded for `counts` (audio tokens of each remaining encoder
        input), and the turn's audio tokens in all (a block-wise slot's earlier blocks included)."""
        if self.blockwise:
            total = self.audio_done + sum(counts)
            return prompt.expand_audio(self.rest, [total])[self.audio_done :], total
        if len(counts) != self.n_audio:
            raise OptionsError(f"the turn was begun with {self.n_audio} audio segments but {len(counts)} were given")
        return prompt.expand_audio(self.rest, counts), sum(counts)


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
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


class CacheLedger:
    """The conversation as the pipeline's KV cache holds it, and every write into that cache.

    `ids` are every id of the conversation, as fed or generated; `ids[:cached]` are in the cache (what is
    not is at most the last answer's final id, fed with the next write). `messages` are the turns as the
    chat template renders them; `context` is the policy's record of the exchanges (their audio embeddings
    included, for a re-prefill). `failed` is True while a write is under way: if it raises, the cache
    holds positions the ids do not describe and the conversation must not go on. The ledger opens, fills
    and closes exchanges; how a turn's audio is encoded, checked and timed is `Conversation`'s part.
    """

    def __init__(self, pipeline: Pipeline, context: ContextPolicy):
        self.p = pipeline
        self.context = context
        self.messages: list[dict] = []
        self.ids: list[int] = []  # every id of the conversation, as fed or generated
        self.cached = 0  # ids[:cached] are in the KV cache
        self.failed = False

    def _roll_back(self) -> None:
        """Forget the prefix of a turn that was begun and then abandoned (e.g. refused as too long)."""
        base = self.context.abandon()
        if base is not None:
            self.ids = self.ids[:base] if self.messages else []
            self.cached = min(self.cached, len(self.ids))

    def begin(
        self, message: dict, n_audio: int, dry_run_counts: list[int] | None, reserve: int, *, defer: bool = False
    ) -> tuple[list[int], int]:
        """Open the exchange of user `message` (`n_audio` audio slots): render it after the history, apply the
        context policy (to the whole prompt given `dry_run_counts`, else to the ids before the first audio
        slot) and prefill those ids, committed (`defer`: not now; the turn's prefill will include them).
        Returns the turn's ids and the first audio slot's index."""
        p = self.p
        self._roll_back()  # an abandoned turn (e.g. refused as too long) leaves no prefix behind
        ids, cut = self._render(message, n_audio)
        dropped = self.context.dropped
        if dry_run_counts is not None:
            self.make_room(len(p.prompt.expand_audio(ids, dry_run_counts)), sum(dry_run_counts), reserve)
        elif cut:
            self.make_room(cut, 0, reserve)
        if self.context.dropped != dropped:  # the history changed under the rendered turn: render it again
            ids, cut = self._render(message, n_audio)
        self.context.begin(start=len(self.ids) + p.prompt.user_start(ids), base=len(self.ids))
        if cut and not defer:
            self.write_text(ids[:cut])  # the turn's header (after the last answer's final id)
        return ids, cut

    def _render(self, message: dict, n_audio: int) -> tuple[list[int], int]:
        ids = self.p.prompt.turn_ids(self.messages, message, self.ids[-1] if self.ids else None)
        return ids, (ids.index(self.p.prompt.audio_token_id) if n_audio else 0)

    def make_room(self, n_new: int, audio_tokens: int, reserve: int) -> None:
        """Apply the context policy for `n_new` more ids (+ `reserve` for the answer), then check the prompt fits."""
        drop = self.context.plan(len(self.ids), n_new, reserve)
        if drop is not None:
            self._drop(drop)
        self.context.check_fits(len(self.ids), n_new, audio_tokens)

    def _drop(self, drop: Drop) -> None:
        """Remove the dropped exchanges' ids and messages, then re-prefill the kept conversation from
        position 0 (audio from the stored embeddings)."""
        p = self.p
        self.failed = True  # until the cache holds the compacted conversation again
        self.context.apply(drop)
        # With nothing kept the next turn renders from scratch (system turn included): drop that too.
        self.ids = self.ids[: drop.first] + self.ids[drop.cut :] if self.context.exchanges else []
        self.messages = self.messages[2 * drop.exchanges :]
        if self.ids:
            with torch.inference_mode():
                embeds = embed_prompt(
                    p.decoder,
                    self.ids,
                    self.context.audio(),
                    p.prompt.audio_token_id,
                    text_spans=self.context.answers(),
                )
                p.decoder(embeds, 0, p.cache)
        self.cached = len(self.ids)
        self.failed = False

    def write_text(self, ids: list[int]) -> None:
        """Prefill text `ids` (no audio slots) after the conversation, committed."""
        p = self.p
        head = self.ids[self.cached :] + ids  # the last answer's final id (if not yet cached), then `ids`
        self.context.check_fits(len(self.ids), len(ids), 0)
        self.failed = True
        with torch.inference_mode():
            p.decoder(p.decoder.embed(torch.tensor([head], device=p.device)), self.cached, p.cache)
        self.ids = self.ids + ids
        self.cached = len(self.ids)
        self.failed = False

    def write_audio(self, audio: torch.Tensor) -> None:
        """Prefill audio embeddings [N, hidden] (on the decoder's device and dtype) into N audio slots after
        the conversation, committed, and keep them with the turn in progress."""
        p = self.p
        n = int(audio.shape[0])
        self.failed = True
        pending = self.ids[self.cached :]  # not yet in the cache: the last answer's final id, if any
        with torch.inference_mode():
            x = embed_prompt(
                p.decoder,
                pending + [p.prompt.audio_token_id] * n,
                audio,
                p.prompt.audio_token_id,
                text_spans=[(0, len(pending))],
            )
            p.decoder(x, self.cached, p.cache)
        self.ids = self.ids + [p.prompt.audio_token_id] * n
        self.cached = len(self.ids)
        self.context.add_audio(audio)
        self.failed = False

    def prefill(
        self, new_ids: list[int], audio_embeds: list[torch.Tensor]
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Prefill `new_ids` (their audio slots filled with `audio_embeds`, in order) after the conversation,
        NOT committed: the ids do not change, so an abandoned prefill is simply overwritten later.

        Returns the last position's logits, the positions written and the audio as prefilled (decoder dtype).
        """
        p = self.p
        pending = self.ids[self.cached :] + new_ids
        with torch.inference_mode():
            audio = torch.cat(audio_embeds).to(p.device, p.dtype) if audio_embeds else None
            # Only the new ids hold audio slots (what precedes them is the last answer's final id).
            embeds = embed_prompt(
                p.decoder, pending, audio, p.prompt.audio_token_id, text_spans=[(0, len(pending) - len(new_ids))]
            )
            logits = p.decoder(embeds, self.cached, p.cache)[0, -1]
        if not torch.isfinite(logits).all():
            raise NumericalError("the decoder produced NaN/Inf logits during prefill; rerun with --dtype fp32 or bf16")
        return logits, len(pending), audio

    def answer(
        self,
        prefilled: PrefilledTurn,
        opts: SamplingOptions,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[str, GenerationStats]:
        """Commit a prefilled turn, decode its answer into the cache after it and commit the exchange."""
        p = self.p
        start = self.cached
        self.ids = self.ids + prefilled.new_ids  # in the cache once prefill ran; generate() appends the answer
        if prefilled.audio_embeds is not None:
            self.context.add_audio(prefilled.audio_embeds)
        self.failed = True  # until the turn completes: a half-written cache must not be reused
        answer_from = len(self.ids)
        stats = GenerationStats(prefill_tokens=prefilled.n_pending, prefill_s=prefilled.prefill_ms / 1000)
        tokens = generate(
            p.decoder,
            p.cache,
            None,
            start,
            self.ids,
            opts,
            p.stop_ids,
            stats,
            first_logits=prefilled.logits,
            prompt_len=prefilled.n_pending,
            should_stop=should_stop,
            step=p.decode_step(),
        )
        text_out = _detokenize(tokens, p.prompt.tokenizer, on_text)
        self.cached = len(self.ids) - 1  # the last generated id is fed at the start of the next turn
        if stats.finish_reason == "stop" and self.ids[-1] != p.prompt.token_id("<|im_end|>"):
            # A stop id that is not the template's end-of-turn (e.g. <|endoftext|>) is not part of the
            # conversation text: drop it so the next turn continues exactly as the template renders it.
            self.ids.pop()
        self.context.finish((answer_from, len(self.ids)))
        self.messages += [prefilled.turn.message, {"role": "assistant", "content": text_out}]
        self.failed = False
        return text_out, stats


class Conversation:
    """A multi-turn chat whose KV cache is kept between turns (text-only turns included).

    Context policy when a turn does not fit in `max_context` (with room for `max_new_tokens`):
    "error" (default for `chat()`) refuses the turn with a LimitError; "drop_oldest" (the default for
    streaming sessions) drops whole exchanges (a user turn and its answer), oldest first, keeping the
    system turn and the turn in progress, then re-prefills what is kept from position 0. The kept audio
    is not re-encoded: each exchange keeps its audio embeddings. If the turn still does not fit once
    nothing is left to drop, it is refused as with "error"; if only the room for the answer is short,
    the answer may end early with finish_reason "context_full". `one_shot`: the conversation serves
    one `Pipeline.run` (a refusal then only suggests what a single run can change).

    Creating a conversation takes the pipeline's KV cache: an older conversation then refuses to go on.
    This class is the turn protocol; what the cache holds, and every write into it, is its `CacheLedger`.
    """

    def __init__(self, pipeline: Pipeline, context_policy: str = "error", *, one_shot: bool = False):
        context = ContextPolicy(
            context_policy, pipeline.max_context, pipeline.decoder.args.max_position_embeddings, one_shot=one_shot
        )
        self.p = pipeline
        pipeline._owner = self
        self.ledger = CacheLedger(pipeline, context)

    # The ledger's state, read-only here (stream sessions and tests read it).
    @property
    def context(self) -> ContextPolicy:
        return self.ledger.context

    @property
    def ids(self) -> list[int]:
        return self.ledger.ids

    @property
    def cached(self) -> int:
        return self.ledger.cached

    @property
    def failed(self) -> bool:
        return self.ledger.failed

    @property
    def context_policy(self) -> str:
        return self.context.policy

    @property
    def dropped_exchanges(self) -> int:
        """Exchanges removed by the "drop_oldest" policy so far."""
        return self.context.dropped

    def _check_usable(self) -> None:
        if self.p._owner is not self:
            raise OptionsError("this conversation's KV cache was taken by a newer conversation; start a new chat()")
        if self.failed:
            raise OptionsError(
                "an earlier turn of this conversation failed mid-generation; start a new chat() "
                "(or reset() a stream session)"
            )

    def send(
        self,
        audio=None,
        text: str | None = None,
        *,
        sampling: SamplingOptions | None = None,
        sampling_rate: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> TurnResult:
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
        # offline the audio is all here: the header joins the turn's one prefill (a separate pass of ~15 rows
        # cost ~55 ms of the mid model's W4 TTFT: the int4 op re-decodes the weight for every row)
        turn = self.begin_turn(
            text, len(segments), dry_run_counts=counts, reserve=opts.max_new_tokens, defer_prefix=True
        )
        t = time.perf_counter()
        mels = [p.mel.log_mel(s) for s in segments]
        timings["mel_ms"] = round(1000 * (time.perf_counter() - t), 3)
        return self.finish_turn(turn, mels, sampling=opts, on_text=on_text, t0=t0, timings=timings)

    def begin_turn(
        self,
        text: str | None,
        n_audio: int,
        *,
        dry_run_counts: list[int] | None = None,
        reserve: int = 0,
        blockwise: bool = False,
        defer_prefix: bool = False,
    ) -> PendingTurn:
        """Render the turn and prefill everything before its first audio slot (the shared prompt prefix).

        Streaming calls this before any audio arrives; `send` calls it too, so offline and streaming runs
        do the same arithmetic. With `dry_run_counts` (known audio token counts) the context policy is
        applied and an overflowing prompt is refused before any work. `blockwise`: the turn's one audio
        slot is filled block by block with `extend_audio` (chunked streaming). `defer_prefix`: prefill
        nothing yet; `prefill_turn` prefills the whole turn in one pass (offline, where no audio is awaited).
        """
        self._check_usable()
        self.p.prompt.check_user_text(text)
        if blockwise and n_audio != 1:
            raise OptionsError("a block-wise turn has exactly one audio slot")
        if blockwise and defer_prefix:
            raise OptionsError("a block-wise turn prefills its header before its first block: defer_prefix=False")
        message = user_message(n_audio, text)
        ids, cut = self.ledger.begin(message, n_audio, dry_run_counts, reserve, defer=defer_prefix)
        if defer_prefix:
            cut = 0
        return PendingTurn(message=message, rest=ids[cut:], n_audio=n_audio, prefilled=cut, blockwise=blockwise)

    def extend_audio(self, turn: PendingTurn, embeds: torch.Tensor, *, reserve: int = 0) -> PendingTurn:
        """Prefill finished audio blocks [N, hidden] of a block-wise turn into the cache, committed.

        Returns the turn with `audio_done` advanced; later blocks and the rest of the prompt follow.
        """
        self._check_usable()
        if not turn.blockwise:
            raise OptionsError("extend_audio needs a turn begun with blockwise=True")
        n = int(embeds.shape[0])
        if n == 0:
            return turn
        if not torch.isfinite(embeds).all():
            raise NumericalError(
                "the audio encoder produced NaN/Inf (fp16 overflow?); rerun with --encoder-precision fp32"
            )
        self.ledger.make_room(n, n, reserve)
        self.ledger.write_audio(embeds.to(self.p.device, self.p.dtype))
        return dataclasses.replace(turn, audio_done=turn.audio_done + n)

    def prefill_turn(self, turn: PendingTurn, mels: Sequence[MelInput], *, reserve: int = 0) -> PrefilledTurn:
        """Encode the turn's audio and prefill the rest of its prompt into the KV cache, without committing.

        The conversation's ids do not change: if the turn is abandoned (speech resumed after a speculative
        endpoint), the cache positions written here are simply overwritten later. (The context policy may
        compact the conversation first; that is a committed, valid state either way.) For a block-wise
        turn, `mels` are its remaining blocks.
        """
        self._check_usable()
        p = self.p
        counts = [m.tokens if isinstance(m, BlockBatch) else num_audio_tokens(m[1]) for m in mels]
        new_ids, audio_tokens = turn.remaining_ids(p.prompt, counts)
        self.ledger.make_room(len(new_ids), sum(counts), reserve)
        t = time.perf_counter()
        audio_embeds = [e for e in p.encode_mels(mels) if e.shape[0]]
        encoder_ms = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        logits, n_pending, audio = self.ledger.prefill(new_ids, audio_embeds)
        return PrefilledTurn(
            turn=turn,
            new_ids=new_ids,
            n_pending=n_pending,
            logits=logits,
            audio_tokens=audio_tokens,
            start=self.cached,
            encoder_ms=encoder_ms,
            prefill_ms=1000 * (time.perf_counter() - t),
            audio_embeds=audio,
        )

    def finish_turn(
        self,
        turn: PendingTurn,
        mels: Sequence[MelInput] | None = None,
        *,
        sampling: SamplingOptions | None = None,
        on_text: Callable[[str], None] | None = None,
        t0: float | None = None,
        timings: dict | None = None,
        prefilled: PrefilledTurn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TurnResult:
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
        text_out, stats = self.ledger.answer(prefilled, opts, on_text, should_stop)
        timings.update(_answer_timings(stats, prefilled, t0))
        if self.dropped_exchanges:
            timings["dropped_exchanges"] = self.dropped_exchanges
        return TurnResult(
            text=text_out, token_ids=list(stats.token_ids), finish_reason=stats.finish_reason, timings=timings
        )


def _answer_timings(stats: GenerationStats, prefilled: PrefilledTurn, t0: float) -> dict:
    """A finished turn's stage timings and token counts (TurnResult.timings), from `t0` (the turn's start)."""
    turn = prefilled.turn
    timings = dict(
        prefill_ms=round(1000 * stats.prefill_s, 3),
        prefill_tokens=stats.prefill_tokens + turn.prefilled,
        audio_tokens=prefilled.audio_tokens,
        ttft_ms=round(1000 * ((stats.first_token_s or time.perf_counter()) - t0), 3),
        decode_tokens=stats.decode_tokens,
        decode_tok_s=round(stats.decode_tokens / stats.decode_s, 3)
        if stats.decode_s > 0 and stats.decode_tokens
        else None,
        total_ms=round(1000 * (time.perf_counter() - t0), 3),
    )
    if turn.blockwise:
        timings["audio_tokens_prefilled_early"] = turn.audio_done  # blocks prefilled while the audio arrived
    return timings


def _detokenize(tokens, tokenizer, on_text: Callable[[str], None] | None) -> str:
    """Consume the token iterator; hand each complete piece of text to `on_text` as it appears; the whole text."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces: list[str] = []
    for token in tokens:
        pieces.append(detok.push(token))
        if pieces[-1] and on_text:
            on_text(pieces[-1])
    pieces.append(detok.flush())
    if pieces[-1] and on_text:
        on_text(pieces[-1])
    return "".join(pieces)
