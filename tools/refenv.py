"""Pinned Python environment for the reference tools.

The reference tools (make_fixtures.py, make_reference.py) must produce the
same numbers on every machine, so they run under one pinned set of packages:

    torch==2.15.0  transformers==5.23.0  tokenizers==0.23.3
    safetensors==0.8.0  numpy==2.4.6  gguf==0.19.0  peft==0.21.2

`ensure_venv()` makes sure the calling script runs inside that environment:
if the current interpreter is not the reference venv, it creates
`$PROTEGE_CACHE/venv-ref` (default `~/.cache/protege/venv-ref`), installs the
pins there unless they are already present, and re-executes the calling
script with the venv's interpreter.

Note: this module shadows the standard library's `venv` for scripts in
tools/, so it never imports it (the venv is created with `python -m venv`
from a neutral working directory).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.23.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "gguf": "0.19.0",
    "peft": "0.21.2",
}

_VERSION_PROBE = (
    "import importlib.metadata as m, json, sys; "
    "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
)


def venv_dir() -> Path:
    cache = os.environ.get("PROTEGE_CACHE", str(Path.home() / ".cache" / "protege"))
    return Path(cache) / "venv-ref"


def _installed_versions(python: Path) -> dict:
    """Versions of the pinned packages in `python`'s environment ({} if any is missing)."""
    if not python.exists():
        return {}
    probe = subprocess.run(
        [str(python), "-c", _VERSION_PROBE, *PINNED],
        capture_output=True,
        text=True,
        cwd="/",
    )
    if probe.returncode != 0:
        return {}
    # Local version suffixes ("2.15.0+cpu") do not matter.
    return {p: v.split("+")[0] for p, v in json.loads(probe.stdout).items()}


def _create(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"[venv] creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd="/")
    pins = [f"{p}=={v}" for p, v in PINNED.items()]
    print(f"[venv] installing {' '.join(pins)}", file=sys.stderr)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True, cwd="/")
    return python


def ensure_venv() -> None:
    """Re-exec the running script under the pinned reference venv (creating it if needed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    venv = venv_dir()
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    python = venv / "bin" / "python"
    if _installed_versions(python) != PINNED:
        python = _create(venv)
        if _installed_versions(python) != PINNED:
            sys.exit(f"[venv] {venv} does not hold the pinned versions {PINNED}")
    os.execv(str(python), [str(python), *sys.argv])
