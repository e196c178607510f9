"""Greedy outputs checked before anything is timed: a speed comparison of engines that compute different
things is meaningless, so a real disagreement aborts the benchmark. measure.py applies it to transformers
fp32 and our pipeline on its fp32 reference kernels (same weights, inputs and arithmetic).

Two engines on the same weights in different arithmetic (our W4 kernels compute in bf16 on the CPU, the
baseline in fp32) can legitimately part at a near-tie: a step where the baseline's two best logits are
closer than the arithmetic's noise. So the rule is: the greedy sequences must be identical, or identical
up to the first difference, where the baseline's top-1/top-2 margin is below `tie_tolerance` × the
step's logit scale (max |logit|); after such a step the sequences are no longer comparable and the check
stops there (how many tokens were compared is recorded). Any other difference raises `DisagreementError`
with the position, both tokens and the margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.errors import QwenAudioEdgeError

# Relative margin below which two engines may pick different argmaxes. Measured on the random shapes:
# W4-with-bf16-matmuls vs fp32 on the dequantized weights differ by up to ~1e-2 of the logit scale, bf16
# transformers by more; 0.03 covers both with margin while a real fault (other weights, a broken kernel)
# differs at a step whose margin is far larger (the abort test plants one).
TIE_TOLERANCE = {"fp32": 0.03, "bf16": 0.06, "fp16": 0.03}


class DisagreementError(QwenAudioEdgeError):
    """Our greedy output and a baseline's differ beyond a near-tie: timing them side by side would mislead."""


@dataclass(frozen=True)
class Agreement:
    """The verdict of one comparison, recorded in the JSON next to the timings it licenses."""

    baseline: str
    compared: int  # tokens compared (up to and including a near-tie step)
    identical: bool  # the whole window identical
    near_tie_at: int | None  # step where the sequences parted at a near-tie (then compared stops there)
    margin_at_tie: float | None  # the baseline's relative top-1/top-2 margin at that step

    def to_json(self) -> dict:
        return {
            "baseline": self.baseline,
            "tokens_compared": self.compared,
            "identical": self.identical,
            "near_tie_at": self.near_tie_at,
            "relative_margin_at_tie": self.margin_at_tie,
        }


def relative_margin(logits: torch.Tensor) -> float:
    """(top-1 − top-2) / max|logit| of one step's logits: how decisive the baseline's choice was."""
    top = torch.topk(logits.float(), 2).values
    scale = float(logits.float().abs().max().clamp_min(1e-12))
    return float(top[0] - top[1]) / scale


def check_agreement(
    ours: list[int], theirs: list[int], their_logits: torch.Tensor, baseline: str, tie_tolerance: float
) -> Agreement:
    """Compare two greedy sequences of the same length; raise DisagreementError on a real difference."""
    n = min(len(ours), len(theirs))
    if n == 0:
        raise DisagreementError(f"{baseline}: nothing to compare (no tokens generated)")
    for i in range(n):
        if ours[i] == theirs[i]:
            continue
        margin = relative_margin(their_logits[i])
        if margin < tie_tolerance:
            return Agreement(baseline, i + 1, False, i, round(margin, 6))
        raise DisagreementError(
            f"our greedy output differs from {baseline}'s at token {i} (ours {ours[i]}, theirs {theirs[i]}; "
            f"the baseline's top-1/top-2 margin there is {margin:.3g} of its logit scale, above the near-tie "
            f"tolerance {tie_tolerance}); the engines do not compute the same thing, so nothing was timed. "
            f"Check the artifacts (qwen-audio-edge compare) or drop this baseline with --baselines"
        )
    return Agreement(baseline, n, len(ours) == len(theirs), None, None)
