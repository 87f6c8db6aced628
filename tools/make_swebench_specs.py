#!/usr/bin/env python3
"""Writes data/swebench/specs.json: the per-repository, per-version evaluation specs of the
official SWE-bench harness (Python repositories), from which `protege tasks import` generates
an instance's eval script when its row does not carry one (SWE-bench 4.x rows).

Source: the `swebench` package 4.1.0 (PyPI), `swebench/harness/constants/python.py`
(MAP_REPO_VERSION_TO_SPECS_PY) and `harness/log_parsers/python.py` (MAP_REPO_TO_PARSER_PY) —
the last release whose harness holds these tables. Only what evaluation reads is kept:
`test_cmd`, `install`, `eval_commands`, and the log parser's registry name per repository.

    python3 -m pip download --no-deps swebench==4.1.0 -d /tmp/swb
    python3 tools/make_swebench_specs.py /tmp/swb/swebench-4.1.0-py3-none-any.whl
"""
import json
import sys
import zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
sys.path.insert(0, str(wheel))  # a wheel is a zip: importable as it is
import importlib.util  # noqa: E402


def load(name, inner):
    with zipfile.ZipFile(wheel) as z:
        src = z.read(inner).decode()
    # The module's own imports of sibling constants are not needed for the tables.
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, inner, "exec"), mod.__dict__)
    return mod


consts = load("c", "swebench/harness/constants/python.py")
specs = {}
for repo, versions in consts.MAP_REPO_VERSION_TO_SPECS_PY.items():
    specs[repo] = {}
    for version, s in versions.items():
        if "test_cmd" not in s:
            print(f"skipped {repo} {version}: no test_cmd", file=sys.stderr)
            continue
        kept = {"test_cmd": s["test_cmd"] if isinstance(s["test_cmd"], str) else " ".join(s["test_cmd"])}
        for key in ("install", "eval_commands"):
            if key in s:
                kept[key] = s[key]
        specs[repo][version] = kept

with zipfile.ZipFile(wheel) as z:
    parsers_src = z.read("swebench/harness/log_parsers/python.py").decode()
parsers = {}
inside = False
for line in parsers_src.splitlines():
    if line.startswith("MAP_REPO_TO_PARSER_PY"):
        inside = True
        continue
    if inside and line.startswith("}"):
        break
    if inside and ":" in line:
        repo, fn = line.strip().rstrip(",").split(":")
        parsers[repo.strip().strip('"')] = fn.strip()
# Aliases resolved to the registry names the 5.x rows carry.
alias = {}
for line in parsers_src.splitlines():
    if line.startswith("parse_log_") and " = parse_log_" in line:
        a, b = [x.strip() for x in line.split("=")]
        alias[a] = b

out = {
    "source": f"swebench {wheel.name} (harness/constants/python.py, harness/log_parsers/python.py)",
    "log_parsers": {r: alias.get(p, p) for r, p in sorted(parsers.items())},
    "specs": specs,
}
dest = Path(__file__).resolve().parent.parent / "data" / "swebench" / "specs.json"
dest.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
print(f"wrote {dest}: {len(specs)} repositories, {sum(len(v) for v in specs.values())} versions")
