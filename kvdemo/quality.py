"""Answer-quality metrics of blending: 🚀's blended answer against 🐢's full prefill of the same token ids.

Pure functions (no engines, no torch), so CI tests them directly; kvdemo.bench.quality (``python -m kvdemo.bench
--quality``) runs them on the GPU against real weights.

- first-token KL: sum over the reference's top-k tokens of ``p * (log p - log q)`` with the raw log-probs
  both engines return (no renormalisation: renormalising one side adds about ``-log(top-k mass)``, ~0.13
  nats for a 135M model, and hides every difference). A reference token missing from the other side's
  top-k gets that side's k-th log-prob minus 1 (it is at most that likely).
- greedy agreement: the identical prefix of two greedy answers, and whether they are identical over all
  generated tokens.
- bootstrap: 95 % intervals of the means, so every number is read against the control's (🐢 against
  itself: cold vs prefix hit), the noise floor of bf16 near-ties.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TOKEN_ID_PREFIX = "token_id:"


def parse_token(token: str) -> int:
    """``"token_id:123"`` (vLLM's ``return_tokens_as_token_ids``) → 123."""
    if not token.startswith(TOKEN_ID_PREFIX):
        raise ValueError(f"expected {TOKEN_ID_PREFIX}<id>, got {token!r}: send return_tokens_as_token_ids")
    return int(token[len(TOKEN_ID_PREFIX):])


def parse_top_logprobs(entry: dict[str, float]) -> dict[int, float]:
    """One position's top log-probs keyed by token id."""
    return {parse_token(tok): float(lp) for tok, lp in entry.items()}


def topk_kl(reference: dict[int, float], other: dict[int, float]) -> float:
    """Partial KL(reference ‖ other) over the reference's top-k, raw log-probs on both sides."""
    if not reference or not other:
        raise ValueError("both sides need log-probs")
    floor = min(other.values()) - 1.0
    return sum(math.exp(lp) * (lp - other.get(tok, floor)) for tok, lp in reference.items())


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy answers share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its percentile-bootstrap interval (resampling prompts)."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return mean, lo, hi


@dataclass(frozen=True)
class Scored:
    """One engine's answer to one prompt: greedy tokens and the top-k log-probs of the first one."""

    tokens: list[int]
    first_top: dict[int, float]


@dataclass(frozen=True)
class PromptResult:
    """What one variant gave on one prompt, next to the reference: the per-prompt numbers."""

    first_token_kl: float
    kl_at: dict[int, float]  # answer tokens appended to the question → KL of the next token
    agree_prefix: int
    identical: bool


def compare(reference: Scored, other: Scored, reference_at: dict[int, dict[int, float]],
            other_at: dict[int, dict[int, float]]) -> PromptResult:
    """Per-prompt metrics of ``other`` against ``reference`` (same prompt, same appended tokens)."""
    n = min(len(reference.tokens), len(other.tokens))
    prefix = identical_prefix(reference.tokens, other.tokens)
    return PromptResult(first_token_kl=topk_kl(reference.first_top, other.first_top),
                        kl_at={k: topk_kl(reference_at[k], other_at[k]) for k in sorted(reference_at)
                               if k in other_at},
                        agree_prefix=prefix, identical=prefix >= n)


def summarize(results: Sequence[PromptResult], seed: int = 0) -> dict:
    """Means (with 95 % bootstrap intervals where the issue asks for them) over prompts."""
    kl, kl_lo, kl_hi = bootstrap_mean_ci([r.first_token_kl for r in results], seed=seed)
    prefix, p_lo, p_hi = bootstrap_mean_ci([float(r.agree_prefix) for r in results], seed=seed)
    out = {"n_prompts": len(results), "first_token_kl": kl, "first_token_kl_ci": [kl_lo, kl_hi]}
    for k in sorted({k for r in results for k in r.kl_at}):
        out[f"kl_at_{k}"] = statistics.fmean(r.kl_at[k] for r in results if k in r.kl_at)
    out.update({"greedy32_agree": statistics.fmean(1.0 if r.identical else 0.0 for r in results),
                "mean_agree_prefix": prefix, "mean_agree_prefix_ci": [p_lo, p_hi]})
    return out


# --------------------------------------------------------------------------------------------------
# The question set and the prompts built from it
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    qid: str
    chunk: str  # the chunk file whose text answers it
    question: str
    answer: str


def load_questions(path: Path, chunk_names: Sequence[str]) -> list[Question]:
    """The committed question set (JSON lines); each line names a chunk of the library."""
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = Question(row["id"], row["chunk"], row["question"], row["answer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path.name} line {n}: needs JSON with id, chunk, question, answer ({exc})") from exc
        if q.chunk not in chunk_names:
            raise ValueError(f"{path.name} line {n}: chunk {q.chunk!r} is not in the chunk library")
        questions.append(q)
    if len({q.qid for q in questions}) != len(questions):
        raise ValueError(f"{path.name}: question ids repeat")
    return questions


@dataclass(frozen=True)
class QualityPrompt:
    question: Question
    chunks: tuple[str, ...]  # in prompt order; the answering chunk is one of them


def sample_prompts(questions: Sequence[Question], chunk_tokens: dict[str, int], fixed_tokens: int, n: int,
                   min_tokens: int, max_tokens: int, seed: int = 0) -> list[QualityPrompt]:
    """n prompts: each question's chunk plus random other chunks, in random order, context within bounds.

    ``fixed_tokens``: the system prompt, BOS and question overhead; each chunk costs ``chunk_tokens[c]``
    (separator included). Questions are taken in a seeded random order (cycling if n > len(questions));
    others are added while the context stays ≤ max_tokens, and a prompt is kept once it reaches
    min_tokens.
    """
    rng = random.Random(seed)
    order = list(questions)
    rng.shuffle(order)
    prompts: list[QualityPrompt] = []
    attempts = 0
    while len(prompts) < n:
        if attempts > 20 * max(n, len(order)):
            raise ValueError(f"cannot build prompts of {min_tokens}-{max_tokens} tokens from these chunks")
        q = order[attempts % len(order)]
        attempts += 1
        chosen = [q.chunk]
        total = fixed_tokens + chunk_tokens[q.chunk]
        others = [c for c in chunk_tokens if c != q.chunk]
        rng.shuffle(others)
        for c in others:
            if total >= min_tokens:
                break
            if total + chunk_tokens[c] <= max_tokens:
                chosen.append(c)
                total += chunk_tokens[c]
        if not min_tokens <= total <= max_tokens:
            continue
        rng.shuffle(chosen)
        prompts.append(QualityPrompt(q, tuple(chosen)))
    return prompts
