"""Answer-quality metrics of blending: 🚀's blended answer against 🐢's full prefill of the same token ids.

Pure functions (no engines, no torch), so CI tests them directly; kvdemo.bench.quality (``python -m kvdemo.bench
--quality``) runs them against real engines and kvdemo.blend_oracle against its torch reference. The settings
both share (``TOP_K``, the answer lengths, ``APPENDED``, the question set, the prompt bounds) are defined here
once.

Columns (per prompt; their means and intervals per variant):

- ``first_token_kl``: the headline. KL(reference ‖ other) of the two next-token distributions *coarsened* to
  the reference's top-k tokens plus one "rest" bucket (:func:`coarse_kl`): a true KL, ≥ 0, 0 for equal
  inputs, and ≤ the full KL whenever the reference's top-k tokens are all in the other side's top-k.
- ``first_token_kl_partial_topk``: the former headline, kept for one release: ``Σ p·(log p − log q)`` over
  the reference's top-k only (:func:`partial_topk_kl`). It has no lower bound (it can be negative).
- ``kl_at_N``: ``first_token_kl`` of the next token after N of the reference's answer tokens were appended
  to the prompt (how blending steers later tokens).
- ``agree_prefix`` / ``identical``: the identical leading tokens of two greedy answers, over the first
  ``ANSWER_TOKENS`` (``greedy32_agree``: the share of prompts identical over all of them).
- ``f1`` / ``cited``: the answer text (greedy, up to ``ANSWER_MAX_TOKENS``, cut at the end-of-sequence token)
  scored against the question set's reference answer (:func:`token_f1`) and whether it names a heading of the
  chunk that answers it (:func:`cites_chunk`).

Both engines return raw log-probs and both sides are used raw: renormalising only one side's top-k adds
about ``−log(top-k mass)`` and hides every difference. Intervals are percentile bootstraps over prompts
(:class:`Bootstrap`); a difference between two variants is paired (the same prompt draw for both sides).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import statistics
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import REPO_ROOT

TOKEN_ID_PREFIX = "token_id:"
TOP_K = 20  # vLLM 0.22 returns at most 20 top log-probs per token
ANSWER_TOKENS = 32  # greedy tokens compared token by token (agree_prefix, identical)
ANSWER_MAX_TOKENS = 128  # greedy tokens decoded into the answer text that F1 and citation score
APPENDED = (8, 16, 32)  # reference answer tokens appended to the prompt for kl_at_N
QUESTIONS_FILE = REPO_ROOT / "data" / "quality_questions.jsonl"
DEFAULT_QUALITY_CONTEXT = (4000, 7000)  # min, max context tokens of a prompt (the single-band default)
CONTEXT_BAND = 0.15  # a --quality-contexts target T samples prompts of T ± max(15 %, 1500) tokens
CONTEXT_BAND_MIN_TOKENS = 1500  # about half a chunk of the library: a narrower band rarely fits
QUESTION_TOKENS = 40  # allowance for the question when sampling (it is tokenized later)
PROMPT_MARGIN = 64  # tokens kept free below --max-model-len
REST_FLOOR = 1e-6  # the smallest "rest" mass given to the other side in coarse_kl
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
EQUIVALENCE_BOUND_NATS = 0.003  # fix equivalence: |mean KL difference| interval must lie within this


def parse_token(token: str) -> int:
    """``"token_id:123"`` (vLLM's ``return_tokens_as_token_ids``) → 123."""
    if not token.startswith(TOKEN_ID_PREFIX):
        raise ValueError(f"expected {TOKEN_ID_PREFIX}<id>, got {token!r}: send return_tokens_as_token_ids")
    return int(token[len(TOKEN_ID_PREFIX):])


def parse_top_logprobs(entry: dict[str, float]) -> dict[int, float]:
    """One position's top log-probs keyed by token id."""
    return {parse_token(tok): float(lp) for tok, lp in entry.items()}


# --------------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------------


def _other_logprob(reference: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """The other side's log-prob of each reference token; one missing from its top-k gets its k-th minus 1."""
    if not reference or not other:
        raise ValueError("both sides need log-probs")
    floor = min(other.values()) - 1.0
    return {tok: other.get(tok, floor) for tok in reference}


def partial_topk_kl(reference: dict[int, float], other: dict[int, float]) -> float:
    """``Σ p·(log p − log q)`` over the reference's top-k, raw log-probs (no lower bound: can be negative).

    The former headline, kept for one release as ``first_token_kl_partial_topk``.
    """
    q = _other_logprob(reference, other)
    return sum(math.exp(lp) * (lp - q[tok]) for tok, lp in reference.items())


def coarse_kl(reference: dict[int, float], other: dict[int, float], rest_floor: float = REST_FLOOR) -> float:
    """KL(P ‖ Q) of both next-token distributions coarsened to the reference's top-k tokens + one "rest" bucket.

    ``p_rest = 1 − Σ p`` and ``q_rest = 1 − Σ q`` over the reference's tokens; a reference token missing from
    the other side's top-k gets that side's k-th log-prob minus 1. Where those imputed values push
    ``q_rest`` below ``min(rest_floor, p_rest)`` it is raised to that, and each side is renormalised (a no-op
    unless rounding or the imputation made it sum past 1), so the result is a true KL: ≥ 0, exactly 0 for
    equal inputs, and ≤ the full KL when no token was imputed (coarsening never increases a divergence).
    """
    q_lp = _other_logprob(reference, other)
    p = {tok: math.exp(lp) for tok, lp in reference.items()}
    q = {tok: math.exp(lp) for tok, lp in q_lp.items()}
    p_rest = max(0.0, 1.0 - sum(p.values()))
    q_rest = max(1.0 - sum(q.values()), min(rest_floor, p_rest))
    log_p_total = math.log(sum(p.values()) + p_rest)
    log_q_total = math.log(sum(q.values()) + q_rest)
    kl = sum(p[tok] * ((reference[tok] - log_p_total) - (q_lp[tok] - log_q_total)) for tok in reference)
    if p_rest > 0:
        kl += p_rest * ((math.log(p_rest) - log_p_total) - (math.log(q_rest) - log_q_total))
    return max(0.0, kl / math.exp(log_p_total))


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy answers share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------


def bootstrap_mean_ci(values: Sequence[float], draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED,
                      level: float = BOOTSTRAP_LEVEL) -> tuple[float, float, float]:
    """Mean and its percentile-bootstrap interval (``draws`` resamples of the prompts, ``random.Random(seed)``)."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(draws))
    lo = means[int((1 - level) / 2 * draws)]
    hi = means[min(draws - 1, int((1 + level) / 2 * draws))]
    return mean, lo, hi


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], draws: int = BOOTSTRAP_DRAWS,
                        seed: int = BOOTSTRAP_SEED, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float, float]:
    """Mean of ``a[i] − b[i]`` and its interval: each draw resamples prompt indices, the same for both sides."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same prompts ({len(a)} vs {len(b)})")
    return bootstrap_mean_ci([x - y for x, y in zip(a, b)], draws, seed, level)


@dataclass(frozen=True)
class Bootstrap:
    """The interval settings of one run (written to its JSON as ``bootstrap``)."""

    draws: int = BOOTSTRAP_DRAWS
    seed: int = BOOTSTRAP_SEED
    level: float = BOOTSTRAP_LEVEL

    def mean_ci(self, values: Sequence[float]) -> tuple[float, float, float]:
        return bootstrap_mean_ci(values, self.draws, self.seed, self.level)

    def diff(self, a: Sequence[float], b: Sequence[float]) -> dict:
        """``{"mean": mean(a − b), "ci": [lo, hi]}``, paired over prompts."""
        mean, lo, hi = paired_bootstrap_ci(a, b, self.draws, self.seed, self.level)
        return {"mean": mean, "ci": [lo, hi]}

    def as_json(self) -> dict:
        return {"seed": self.seed, "draws": self.draws, "level": self.level,
                "resamples": "prompts (percentile intervals; a difference draws one prompt set for both sides)"}


# --------------------------------------------------------------------------------------------------
# Per prompt and per variant
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One engine's answer to one prompt: greedy tokens and the top-k log-probs of the first one."""

    tokens: list[int]
    first_top: dict[int, float]


@dataclass(frozen=True)
class PromptResult:
    """What one variant gave on one prompt, next to the reference: the per-prompt numbers."""

    first_token_kl: float
    first_token_kl_partial_topk: float
    kl_at: dict[int, float]  # answer tokens appended to the question → coarse KL of the next token
    agree_prefix: int
    identical: bool
    f1: float | None = None  # this variant's answer text against the question set's answer
    cited: bool | None = None  # whether that text names a heading of the answering chunk

    def value(self, metric: str) -> float:
        """One column as a number: ``first_token_kl``, ``kl_at_8``, ``agree_prefix``, ``identical``, ``f1``..."""
        if metric.startswith("kl_at_"):
            return self.kl_at[int(metric[len("kl_at_"):])]
        value = getattr(self, metric)
        if value is None:
            raise ValueError(f"no {metric} recorded")
        return float(value)

    def as_json(self) -> dict:
        out = asdict(self)
        out.pop("kl_at")
        out.update({f"kl_at_{k}": v for k, v in sorted(self.kl_at.items())})
        return out


def compare(reference: Scored, other: Scored, reference_at: dict[int, dict[int, float]],
            other_at: dict[int, dict[int, float]], answer_tokens: int = ANSWER_TOKENS) -> PromptResult:
    """Per-prompt metrics of ``other`` against ``reference`` (same prompt, same appended tokens); greedy
    agreement over the first ``answer_tokens`` tokens."""
    ref, oth = reference.tokens[:answer_tokens], other.tokens[:answer_tokens]
    prefix = identical_prefix(ref, oth)
    return PromptResult(first_token_kl=coarse_kl(reference.first_top, other.first_top),
                        first_token_kl_partial_topk=partial_topk_kl(reference.first_top, other.first_top),
                        kl_at={k: coarse_kl(reference_at[k], other_at[k]) for k in sorted(reference_at)
                               if k in other_at},
                        agree_prefix=prefix, identical=prefix >= min(len(ref), len(oth)))


def values(results: Sequence[PromptResult], metric: str) -> list[float]:
    """One column over prompts (see :meth:`PromptResult.value`)."""
    return [r.value(metric) for r in results]


def summarize(results: Sequence[PromptResult], boot: Bootstrap | None = None) -> dict:
    """Means over prompts, with intervals for the headline KL, the agreement, F1 and citation accuracy."""
    boot = boot or Bootstrap()
    kl, kl_lo, kl_hi = boot.mean_ci(values(results, "first_token_kl"))
    prefix, p_lo, p_hi = boot.mean_ci(values(results, "agree_prefix"))
    out = {"n_prompts": len(results), "first_token_kl": kl, "first_token_kl_ci": [kl_lo, kl_hi],
           "first_token_kl_partial_topk": statistics.fmean(values(results, "first_token_kl_partial_topk"))}
    for k in sorted({k for r in results for k in r.kl_at}):
        out[f"kl_at_{k}"] = statistics.fmean(r.kl_at[k] for r in results if k in r.kl_at)
    out.update({"greedy32_agree": statistics.fmean(values(results, "identical")),
                "mean_agree_prefix": prefix, "mean_agree_prefix_ci": [p_lo, p_hi]})
    if all(r.f1 is not None and r.cited is not None for r in results):
        out.update(answer_summary([r.f1 for r in results], [r.cited for r in results], boot))
    return out


def answer_summary(f1: Sequence[float | None], cited: Sequence[bool | None], boot: Bootstrap) -> dict:
    """``f1``, ``cite_acc`` and their intervals over prompts."""
    mean_f1, f1_lo, f1_hi = boot.mean_ci([float(x or 0.0) for x in f1])
    acc, acc_lo, acc_hi = boot.mean_ci([1.0 if c else 0.0 for c in cited])
    return {"f1": mean_f1, "f1_ci": [f1_lo, f1_hi], "cite_acc": acc, "cite_acc_ci": [acc_lo, acc_hi]}


# --------------------------------------------------------------------------------------------------
# Answer text: token F1 and citation
# --------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_UNDERLINE = re.compile(r"^([*=\-~^\"'`+#])\1{2,}\s*$")


def _punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed (ASCII and Unicode), articles a/an/the removed,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if not _punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of two texts after :func:`normalize_answer` (1.0 if both are empty, 0.0 if one is)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def chunk_headings(text: str) -> list[str]:
    """A chunk file's headings: its ``# Title`` line, the title's part before a colon when that has two or more
    words (``Data model``), and every section heading (a line underlined by one character repeated, e.g.
    ``*****`` or ``=====``), in file order, without repeats."""
    lines = text.splitlines()
    found: list[str] = []
    if lines and lines[0].startswith("#"):
        title = lines[0].lstrip("#").strip()
        head, colon, _ = title.partition(":")
        found += [title] + ([head.strip()] if colon and len(normalize_answer(head).split()) >= 2 else [])
    for above, line in itertools.pairwise(lines):
        if _UNDERLINE.match(line) and above.strip() and not _UNDERLINE.match(above):
            found.append(above.strip())
    return list(dict.fromkeys(found))


def names_heading(answer: str, heading: str) -> bool:
    """Whether ``answer`` names ``heading``.

    A heading of two or more words after :func:`normalize_answer` (``The "try" statement`` → ``try statement``)
    must appear as consecutive words of the normalised answer (any case, quotes, articles). A one-word heading
    (``Comparisons``) must appear as a whole word with the heading's own capitalisation, so that the common
    word in running text (``comparisons``) does not count as a citation.
    """
    words = normalize_answer(heading).split()
    if not words:
        return False
    if len(words) == 1:
        bare = "".join(ch for ch in heading if not _punctuation(ch)).strip()
        return re.search(rf"(?<!\w){re.escape(bare)}(?!\w)", answer) is not None
    said = normalize_answer(answer).split()
    n = len(words)
    return any(said[i:i + n] == words for i in range(len(said) - n + 1))


def cites_chunk(answer: str, headings: Iterable[str]) -> bool:
    """Citation accuracy of one answer: it names at least one heading of the chunk that answers the question
    (:func:`chunk_headings` of that chunk, :func:`names_heading`). Naming other chunks' headings as well is
    not penalised."""
    return any(names_heading(answer, h) for h in headings)


def until_stop(tokens: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """The tokens before the first end-of-sequence id: what a request without ``ignore_eos`` would return."""
    stops = set(stop_ids)
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
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


def prompt_overhead(builder) -> int:
    """Tokens of a prompt besides its chunks (kvdemo.prompts.PromptBuilder): BOS, system prompt, the question's
    separator and an allowance for the question."""
    return len(builder.bos_ids) + len(builder.sys_ids()) + len(builder.sep_ids) + QUESTION_TOKENS


def prompt_budget(max_model_len: int, answer_max_tokens: int = ANSWER_MAX_TOKENS) -> int:
    """The longest prompt whose answer and appended requests fit ``max_model_len``."""
    return max_model_len - max(answer_max_tokens, max(APPENDED) + 1) - PROMPT_MARGIN


def context_band(target: int) -> tuple[int, int]:
    """Prompt bounds of a ``--quality-contexts`` target: ``target ± max(CONTEXT_BAND·target, 1500)``."""
    half = max(round(target * CONTEXT_BAND), CONTEXT_BAND_MIN_TOKENS)
    return max(1, target - half), target + half


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
