"""What a conversation does when a turn does not fit in its KV cache, and the bookkeeping that needs.

A conversation's ids are the system turn followed by exchanges (a user turn and its answer). To drop the
oldest exchanges and re-prefill the rest, the conversation must know where each exchange starts in its
ids, which audio embeddings its slots hold (audio is not re-encoded) and which ids are generated text
(an answer may contain the audio token id, which is then not a slot). `ContextPolicy` keeps exactly
that, decides what to drop, and words the refusal when nothing helps; a conversation's `CacheLedger`
(runtime/conversation.py) applies a drop to its ids, messages and cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import LimitError, OptionsError

CONTEXT_POLICIES = ("error", "drop_oldest")


@dataclass
class Exchange:
    """One user turn + its answer: where it starts in the conversation ids, and its audio embeddings."""

    start: int
    base: int  # len(ids) before the turn was begun (an abandoned turn is rolled back to it)
    audio: list[torch.Tensor] = field(default_factory=list)
    # [from, to) of the generated answer in the ids: an answer may contain the audio token id itself, which
    # must not be taken for an audio slot when the conversation is re-prefilled.
    answer: tuple[int, int] | None = None


@dataclass(frozen=True)
class Drop:
    """Remove `exchanges` whole exchanges: the conversation ids [first, cut)."""

    exchanges: int
    first: int
    cut: int


class ContextPolicy:
    """The exchanges of one conversation and its policy for a turn that does not fit in `max_context`.

    "error" refuses the turn with a LimitError. "drop_oldest" drops whole finished exchanges, oldest
    first (the system turn and the turn in progress stay), until the turn and `reserve` answer
    positions fit; if the prompt still does not fit once nothing is left to drop, it is refused as
    with "error". `one_shot`: the conversation serves a single `Pipeline.run`, so the refusal does
    not suggest what only a multi-turn conversation can do.
    """

    def __init__(self, policy: str, max_context: int, model_limit: int, *, one_shot: bool = False):
        if policy not in CONTEXT_POLICIES:
            raise OptionsError(f"context policy must be one of {CONTEXT_POLICIES}, got {policy!r}")
        self.policy = policy
        self.max_context = max_context
        self.model_limit = model_limit
        self.one_shot = one_shot
        self.exchanges: list[Exchange] = []
        self.open = False  # the last exchange is a turn in progress (begun, not finished)
        self.dropped = 0  # exchanges removed so far

    # --- exchanges --------------------------------------------------------------------------------
    def begin(self, start: int, base: int) -> None:
        self.exchanges.append(Exchange(start=start, base=base))
        self.open = True

    def abandon(self) -> int | None:
        """Forget a turn in progress (refused, or given up); returns the ids length to roll back to."""
        if not self.open:
            return None
        self.open = False
        return self.exchanges.pop().base

    def finish(self, answer: tuple[int, int]) -> None:
        self.exchanges[-1].answer = answer
        self.open = False

    def add_audio(self, embeds: torch.Tensor) -> None:
        """Audio embeddings now in the turn in progress' slots (kept for a re-prefill)."""
        self.exchanges[-1].audio.append(embeds)

    def audio(self) -> list[torch.Tensor]:
        """Every kept audio embedding, in prompt order."""
        return [a for e in self.exchanges for a in e.audio]

    def answers(self) -> list[tuple[int, int]]:
        """The [from, to) id ranges of the kept answers (generated text: no audio slots there)."""
        return [e.answer for e in self.exchanges if e.answer is not None]

    # --- the policy -------------------------------------------------------------------------------
    def plan(self, n_ids: int, n_new: int, reserve: int) -> Drop | None:
        """What to drop so that `n_new` more ids and `reserve` answer positions fit after `n_ids`: the
        fewest oldest finished exchanges that free enough, or all of them if none suffices; None when
        nothing needs (or, by the policy, may) be dropped."""
        excess = n_ids + n_new + reserve + 1 - self.max_context
        finished = len(self.exchanges) - (1 if self.open else 0)
        if excess <= 0 or self.policy != "drop_oldest" or finished <= 0:
            return None
        first = self.exchanges[0].start

        def cut_after(k: int) -> int:
            return self.exchanges[k].start if k < len(self.exchanges) else n_ids

        k = 1
        while k < finished and cut_after(k) - first < excess:
            k += 1
        return Drop(exchanges=k, first=first, cut=cut_after(k))

    def apply(self, drop: Drop) -> None:
        """Forget the dropped exchanges and move the kept ones to their positions after the cut."""
        removed = drop.cut - drop.first
        kept = self.exchanges[drop.exchanges :]
        for e in kept:
            e.start -= removed
            e.base = max(drop.first, e.base - removed)
            if e.answer is not None:
                e.answer = (e.answer[0] - removed, e.answer[1] - removed)
        self.exchanges = kept
        self.dropped += drop.exchanges

    def check_fits(self, n_ids: int, n_new: int, audio_tokens: int) -> None:
        """LimitError, saying what the caller can do, when `n_new` more prompt ids do not fit after `n_ids`."""
        total = n_ids + n_new
        if total < self.max_context:
            return
        raise LimitError(
            f"the prompt needs {total} positions (conversation {n_ids}, this turn {n_new}, of which {audio_tokens} "
            f"audio tokens) but the context holds {self.max_context}; {self._advice()}"
        )

    def _advice(self) -> str:
        # The answer's room (max_new_tokens) is not part of this check: a short room ends the answer early
        # ("context_full"), it does not refuse the turn, so a smaller --max-new-tokens would not help here.
        prefix, note = "", ""
        if self.one_shot:
            options = ["use shorter audio or a shorter prompt"]
        elif self.policy == "drop_oldest":  # nothing is left to drop: the turn alone is too long
            prefix, options = (
                "with every earlier exchange dropped this turn is still too long: ",
                ["use shorter audio or text"],
            )
        else:
            options = ["start a new conversation", "use the drop_oldest context policy", "use shorter audio or text"]
        if self.max_context < self.model_limit:
            options.append(f"raise --max-context (up to the model's {self.model_limit} positions)")
        else:
            note = f" (--max-context is already the model's limit, {self.model_limit} positions)"
        listed = options[0] if len(options) == 1 else ", ".join(options[:-1]) + ", or " + options[-1]
        return prefix + listed + note
