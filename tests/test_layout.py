"""The layering rule: the library (hci_atr/) knows nothing of the app (workflows/, serve/) nor of Ray, MLflow, HTTP
or the CLI. Checked twice: every import statement in the source (also those inside functions), and what importing
every library module really loads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "hci_atr"
FORBIDDEN = ("workflows", "serve", "ray", "mlflow", "click", "fastapi", "starlette", "uvicorn")


def _library_modules() -> list[str]:
    out = []
    for p in sorted(LIBRARY.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
    return names


def test_no_library_source_imports_the_app_or_its_engines():
    bad = []
    for p in sorted(LIBRARY.rglob("*.py")):
        for line, name in _imported_names(p):
            if name.split(".")[0] in FORBIDDEN:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_importing_every_library_module_loads_none_of_them():
    mods = _library_modules()
    assert "hci_atr.config" in mods and len(mods) > 15
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted({{k.split('.')[0] for k in sys.modules}} & set({list(FORBIDDEN)!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", ["HciAtrModel", "Retriever", "read_dataset", "retrieval_metrics", "Config"])
def test_the_package_exports_what_a_user_calls(name):
    import hci_atr

    assert name in hci_atr.__all__
    assert callable(getattr(hci_atr, name))
