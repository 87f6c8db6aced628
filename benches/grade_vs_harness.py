#!/usr/bin/env python3
"""`protege grade` against the official harness (`python -m swebench.harness.run_evaluation`,
swebench 5.0.2) on the same images, rows and predictions, side by side in one run: wall time
and verdicts.

    python3 benches/grade_vs_harness.py [N_INSTANCES] [WORKERS]     (default 12, 2)

Needs a Docker daemon, a release build (`cargo build --release`), and the harness in a venv:
    python3 -m venv ~/.cache/protege/harness-venv
    ~/.cache/protege/harness-venv/bin/pip install swebench==5.0.2
The instances are SWE-bench 5.x rows of a small repository built here (tools/docker_fixture.sh);
a third of the predictions are gold, a third wrong, a third do not apply.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = int(sys.argv[1]) if len(sys.argv) > 1 else 12
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
VENV = Path(os.environ.get("PROTEGE_CACHE", Path.home() / ".cache/protege")) / "harness-venv"
IMAGE = "protege-bench-geometry:latest"

SRC = {
    "geometry/__init__.py": "def area(w, h):\n    return w + h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n",
    "tests/test_perimeter.py": "from geometry import perimeter\n\n\ndef test_perimeter():\n    assert perimeter(2, 3) == 10\n",
}
GOLD = "diff --git a/geometry/__init__.py b/geometry/__init__.py\n--- a/geometry/__init__.py\n+++ b/geometry/__init__.py\n@@ -1,5 +1,5 @@\n def area(w, h):\n-    return w + h\n+    return w * h\n \n \n def perimeter(w, h):\n"
WRONG = GOLD.replace("+    return w * h\n", "+    return w * h + 1\n")
BROKEN = GOLD.replace("-    return w + h\n", "-    return w - h\n")
TEST_PATCH = "diff --git a/tests/test_area.py b/tests/test_area.py\nnew file mode 100644\n--- /dev/null\n+++ b/tests/test_area.py\n@@ -0,0 +1,5 @@\n+from geometry import area\n+\n+\n+def test_area():\n+    assert area(2, 3) == 6\n"


def main():
    tmp = Path(tempfile.mkdtemp())
    repo = tmp / "repo"
    for rel, text in SRC.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    base = subprocess.run([ROOT / "tools/docker_fixture.sh", "instance", IMAGE, repo], check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    script = (f"#!/bin/bash\nset -uxo pipefail\nsource /opt/miniconda3/bin/activate\nconda activate testbed\n"
              f"cd /testbed\ngit status\ngit -c core.fileMode=false diff {base}\n"
              f"git apply -v - <<'EOF_114329324912'\n{TEST_PATCH}\nEOF_114329324912\n"
              f": '>>>>> Start Test Output'\npytest -rA tests/test_area.py tests/test_perimeter.py\n"
              f": '>>>>> End Test Output'\n")
    rows, preds = [], []
    for i in range(N):
        iid = f"acme__geometry-{i}"
        rows.append({"instance_id": iid, "repo": "acme/geometry", "base_commit": base, "patch": GOLD,
                     "test_patch": TEST_PATCH, "problem_statement": "area adds", "hints_text": "",
                     "created_at": "2026", "version": "1.0", "environment_setup_commit": base,
                     "FAIL_TO_PASS": json.dumps(["tests/test_area.py::test_area"]),
                     "PASS_TO_PASS": json.dumps(["tests/test_perimeter.py::test_perimeter"]),
                     "image": IMAGE, "eval_script": script, "log_parser": "parse_log_pytest",
                     "eval_type": "pass_and_fail"})
        preds.append({"instance_id": iid, "model_name_or_path": "bench", "model_patch": [GOLD, WRONG, BROKEN][i % 3]})
    (tmp / "rows.json").write_text(json.dumps(rows))
    (tmp / "preds.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))

    t = time.time()
    subprocess.run([ROOT / "target/release/protege", "grade", "--suite", tmp / "rows.json", "--predictions",
                    tmp / "preds.jsonl", "--out", tmp / "protege", "--workers", str(WORKERS), "--no-protect"],
                   check=True, capture_output=True)
    protege_s = time.time() - t
    ours = json.loads((tmp / "protege/report.json").read_text())

    t = time.time()
    subprocess.run([VENV / "bin/python", "-m", "swebench.harness.run_evaluation", "--dataset_name", tmp / "rows.json",
                    "--predictions_path", tmp / "preds.jsonl", "--run_id", "bench", "--max_workers", str(WORKERS),
                    "--report_dir", tmp / "harness"], cwd=tmp, check=True, capture_output=True)
    harness_s = time.time() - t
    theirs = json.loads(next((tmp / "harness").glob("*.json")).read_text())

    same = all(sorted(ours[k]) == sorted(theirs[k]) for k in ["resolved_ids", "unresolved_ids", "error_ids", "empty_patch_ids"])
    print(f"| {N} instances, {WORKERS} workers | protege grade | official harness | ratio |\n|---|---|---|---|")
    print(f"| wall time | {protege_s:.1f} s | {harness_s:.1f} s | {protege_s / harness_s:.2f}x |")
    print(f"| resolved / unresolved / error | {len(ours['resolved_ids'])} / {len(ours['unresolved_ids'])} / "
          f"{len(ours['error_ids'])} | {len(theirs['resolved_ids'])} / {len(theirs['unresolved_ids'])} / "
          f"{len(theirs['error_ids'])} | {'same verdicts' if same else 'VERDICTS DIFFER'} |")
    shutil.rmtree(tmp, ignore_errors=True)
    if not same:
        print(json.dumps({"protege": ours, "harness": theirs}, indent=1))
        sys.exit(1)


if __name__ == "__main__":
    main()
