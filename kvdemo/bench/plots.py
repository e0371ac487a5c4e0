"""The bench's figures, one per scenario (each protocol in cases.py names its own), given matplotlib.pyplot."""

from __future__ import annotations

from pathlib import Path


def layout_text(result: dict) -> str:
    """``2 engines on 1 GPU`` / ``4 engines on 2 GPUs`` from the result's ``gpu_layout``: the same bench
    on one or on two GPUs must not look alike on a plot."""
    layout = result.get("gpu_layout") or []
    gpus = {slot.get("gpu") for slot in layout if slot.get("gpu") is not None}
    if not layout or not gpus:
        return ""
    return f"{len(layout)} engines on {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}"


def _title_device(result: dict) -> str:
    layout = layout_text(result)
    return f"{result['device']} ({layout})" if layout else result["device"]


def plot_blend(result: dict, png: Path, plt) -> None:
    cases = result["cases"]
    x = [c["context_tokens"] / 1000 for c in cases]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"plain_cold_ttft_s": ("plain vLLM, cold", "tab:gray", "o--"),
              "plain_reordered_ttft_s": ("plain vLLM, chunks reordered", "tab:red", "o-"),
              "plain_prefix_hit_ttft_s": ("plain vLLM, same prefix (cache hit)", "tab:orange", "s:"),
              "blend_reordered_ttft_s": ("vLLM + LMCache blending, reordered", "tab:blue", "o-"),
              "blend_same_order_ttft_s": ("vLLM + LMCache blending, same order", "tab:cyan", "s:")}
    for key, (label, color, fmt) in styles.items():
        ax.plot(x, [c[key] for c in cases], fmt, color=color, label=label)
    for c, xi in zip(cases, x):
        ax.annotate(f"{c['speedup_reordered']:.2f}×", (xi, c["blend_reordered_ttft_s"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", color="tab:blue", fontsize=9)
    ax.set_xlabel("context tokens (thousands), 8 chunks")
    ax.set_ylabel("time to first token (s), median")
    v = result["versions"]
    ax.set_title(f"{_title_device(result)} · {result['model_shape']} ({result['weights']} weights)\n"
                 f"vllm {v.get('vllm')} + lmcache {v.get('lmcache')}, torch {v.get('torch')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_share(result: dict, png: Path, plt) -> None:
    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = {"a_cold_ttft_s": ("LMCache A (cold, stores)", "tab:blue"),
              "b_after_a_ttft_s": ("LMCache B after A (loads; store in page cache)", "tab:cyan"),
              "b_after_a_cold_store_ttft_s": ("LMCache B after A (loads; store dropped from page cache)",
                                              "tab:purple"),
              "plain_a_ttft_s": ("plain vLLM A", "tab:red"), "plain_b_ttft_s": ("plain vLLM B", "tab:orange")}
    labels = {k: v for k, v in labels.items() if all(c.get(k) is not None for c in cases)}
    width = 0.8 / len(labels)
    for i, (key, (label, color)) in enumerate(labels.items()):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, [c[key] for c in cases], width, label=label, color=color)
    ax.set_xticks(range(len(cases)), [f"{c['context_tokens'] / 1000:.0f}K tokens" for c in cases])
    ax.set_ylabel("time to first token (s), median")
    v = result["versions"]
    ax.set_title(f"KV sharing · {_title_device(result)} · {result['weights']} weights\n"
                 f"vllm {v.get('vllm')} + lmcache {v.get('lmcache')}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
