"""Token layout: what is blended, what was stored, where the gaps are; the harness's prompts in that layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import quality as qm
from ..config import REPO_ROOT
from .settings import BLEND_CONFIG, MAX_MODEL_LEN, QUALITY_CONTEXT, QUESTIONS_FILE


@dataclass(frozen=True)
class Segment:
    """One stored segment: where it sits in the prompt and the precompute request that stored its KV."""

    start: int  # first prompt position
    length: int
    stored: tuple[int, ...]  # ids of the precompute request ([BOS]+sys or [BOS]+SEP+chunk)
    offset: int  # first position of the segment inside `stored` (its stored RoPE position)


@dataclass(frozen=True)
class BlendPrompt:
    """A prompt as LMCache blends it: ``ids[:blend_len]`` from stored segments and gaps, the rest prefilled."""

    ids: tuple[int, ...]
    blend_len: int
    segments: tuple[Segment, ...]
    gaps: tuple[int, ...]  # prompt positions of separator tokens inside the blended part
    label: str = ""


def blend_layout(bos: Sequence[int], sys_ids: Sequence[int], chunks: Sequence[Sequence[int]], sep: Sequence[int],
                 question: Sequence[int], label: str = "") -> BlendPrompt:
    """``[BOS]+sys + (SEP+chunk)* + SEP+question`` with the segments LMCache's lookup hits (all but the question).

    The stored requests are kvdemo.prompts.PromptBuilder.precompute_layout's: ``[BOS]+sys`` (segment at 0)
    and ``[BOS]+SEP+chunk`` (segment at ``len(BOS)+len(SEP)``).
    """
    ids = list(bos) + list(sys_ids)
    segments = [Segment(0, len(ids), tuple(ids), 0)]
    gaps: list[int] = []
    for chunk in chunks:
        gaps += range(len(ids), len(ids) + len(sep))
        ids += sep
        segments.append(Segment(len(ids), len(chunk), tuple(bos) + tuple(sep) + tuple(chunk), len(bos) + len(sep)))
        ids += chunk
    blend_len = len(ids)
    ids += list(sep) + list(question)
    return BlendPrompt(tuple(ids), blend_len, tuple(segments), tuple(gaps), label)


def harness_prompts(tokenizer, n: int, seed: int = 0, questions: Path = QUESTIONS_FILE,
                    data_dir: Path = REPO_ROOT / "data", lmcache_config: Path = BLEND_CONFIG,
                    context_target: int | None = None, max_model_len: int = MAX_MODEL_LEN) -> list[BlendPrompt]:
    """The quality harness's first n prompts at its default context band, or at ``context_target``'s band as
    ``--quality-contexts`` gives it (kvdemo.bench.quality.run_quality samples them with the same function,
    seed, bounds and budget: pass its ``--max-model-len``)."""
    from ..lmcache_config import LmcacheConfig
    from ..prompts import ChunkLibrary, PromptBuilder

    library = ChunkLibrary.load(data_dir)
    builder = PromptBuilder(tokenizer, library, separator=LmcacheConfig.load(lmcache_config).separator)
    qs = qm.load_questions(questions, list(library.chunks))
    sep = len(builder.sep_ids)
    chunk_tokens = {c: len(builder.chunk_ids(c)) + sep for c in library.chunks}
    budget = qm.prompt_budget(max_model_len)
    lo, hi = qm.context_band(context_target) if context_target else QUALITY_CONTEXT
    sampled = qm.sample_prompts(qs, chunk_tokens, qm.prompt_overhead(builder), n, lo, min(hi, budget), seed=seed)
    out = []
    for p in sampled:
        bp = blend_layout(builder.bos_ids, builder.sys_ids(), [builder.chunk_ids(c) for c in p.chunks],
                          builder.sep_ids, builder.question_ids(p.question.question),
                          label=f"{p.question.qid}: {' + '.join(p.chunks)}")
        if list(bp.ids) != builder.build(list(p.chunks), p.question.question):
            raise AssertionError("blend_layout disagrees with PromptBuilder.build")
        stored = builder.precompute_layout(builder.sys_ids(), [builder.chunk_ids(c) for c in p.chunks])
        if [list(s.stored) for s in bp.segments] != stored:
            raise AssertionError("blend_layout disagrees with PromptBuilder.precompute_layout")
        out.append(bp)
    return out
