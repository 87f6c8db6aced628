#!/usr/bin/env python3
"""Writes tests/fixtures/swebench_rows.parquet (a SWE-bench row, test lists as JSON strings)
with its JSONL twin, and swegym_rows.parquet (test lists as lists), as `datasets` writes them
(pyarrow, snappy). `protege tasks import` must read a Parquet file as its JSONL twin.

    python3 -m pip install pyarrow && python3 tools/make_parquet_fixture.py
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FIX = "diff --git a/pkg/m.py b/pkg/m.py\n--- a/pkg/m.py\n+++ b/pkg/m.py\n@@ -1,2 +1,2 @@\n def f(x):\n-    return x + 1\n+    return x + 2\n"
TESTS = "diff --git a/tests/test_m.py b/tests/test_m.py\n--- a/tests/test_m.py\n+++ b/tests/test_m.py\n@@ -1,2 +1,4 @@\n from pkg.m import f\n def test_old(): assert f(0) == 2\n+def test_new(): assert f(1) == 3\n"
rows_bench = [{
    "instance_id": "psf__requests-1963", "repo": "psf/requests", "base_commit": "110048f9837f8441ea536804115e80b69f400277",
    "patch": FIX, "test_patch": TESTS, "problem_statement": "f is off by one", "hints_text": "",
    "created_at": "2014-03-14T23:18:42Z", "version": "2.3",
    "FAIL_TO_PASS": json.dumps(["tests/test_m.py::test_new"]), "PASS_TO_PASS": json.dumps(["tests/test_m.py::test_old"]),
    "environment_setup_commit": "110048f9837f8441ea536804115e80b69f400277",
}]
root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
pq.write_table(pa.Table.from_pylist(rows_bench), root / "swebench_rows.parquet", compression="snappy")
(root / "swebench_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_bench))
rows_gym = [{
    "instance_id": "getmoto__moto-5752", "repo": "getmoto/moto", "base_commit": "b2300f1eae1323e3e8bc45f97e530ce129dff12e",
    "patch": FIX, "test_patch": TESTS, "problem_statement": "f is off by one", "hints_text": "", "created_at": "2022-12-08",
    "version": "4.0", "FAIL_TO_PASS": ["tests/test_m.py::test_new"], "PASS_TO_PASS": ["tests/test_m.py::test_old"],
    "environment_setup_commit": "b2300f1eae1323e3e8bc45f97e530ce129dff12e",
}]
pq.write_table(pa.Table.from_pylist(rows_gym), root / "swegym_rows.parquet", compression="snappy")
print("wrote", root / "swebench_rows.parquet", root / "swegym_rows.parquet")
