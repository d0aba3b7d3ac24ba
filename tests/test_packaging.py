"""The project installs beside what transformers requires: Hugging Face's `kernels` package owns the
top-level name `kernels`, and this project's kernels/ folder is imported as `engine.kernels` (issue #33),
from the repository root, from anywhere else, and from a built wheel."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from live_server import ROOT

# Run in a fresh interpreter: HF's `kernels` first, as transformers imports it, then the engine end to end.
SIDE_BY_SIDE = """
import sys
from pathlib import Path
import kernels
import transformers.integrations.hub_kernels  # what failed with the old top-level package: from kernels import ...
from engine import LLM
import engine.kernels.paged
root = Path(sys.argv[1])
assert not Path(kernels.__file__).resolve().is_relative_to(root), kernels.__file__
assert Path(engine.kernels.paged.__file__).resolve() == root / "kernels" / "paged.py"
llm = LLM(sys.argv[2], enforce_eager=True)
print(llm.generate([[1, 2, 3]], max_tokens=3, temperature=0))
"""


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_hugging_face_kernels_and_the_engine_side_by_side(tiny_qwen3, tmp_path, where):
    cwd = ROOT if where == "root" else tmp_path
    proc = subprocess.run(
        [sys.executable, "-c", SIDE_BY_SIDE, str(ROOT), str(tiny_qwen3)], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("["), proc.stdout


def test_no_module_imports_the_top_level_kernels_name():
    for path in [ROOT / "server.py", *ROOT.glob("engine/**/*.py"), *ROOT.glob("kernels/*.py"),
                 *ROOT.glob("tests/**/*.py"), *ROOT.glob("experiments/*.py")]:  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n == "kernels" or n.startswith("kernels.")], f"{path}: {names}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "an __init__.py makes kernels/ shadow HF's package"


@pytest.mark.slow
def test_a_built_wheel_holds_the_kernels_under_engine(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"engine/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected <= names and not any(n.startswith("kernels/") for n in names)
    # and every other module of the package (engine/quant was once left out)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import engine.kernels.paged as p, sys; print(p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True)  # fmt: skip
    assert Path(out.stdout.strip()).is_relative_to(site), out.stderr[-2000:]
