"""Grades a corpus of test logs with the official SWE-bench harness (the `swebench` package).

    python tools/swebench_grade_logs.py tests/fixtures/swebench_logs/cases.json

The manifest lists cases `{name, parser, log, FAIL_TO_PASS, PASS_TO_PASS, eval_type}` (`log`
relative to the manifest). For each, this prints what the harness's own functions say, as one
JSON object keyed by case name:

    {"status_map": [[test id, status], ...] in the parser's order, or null when
                   get_logs_eval finds the log invalid,
     "tests_status": get_eval_report's tests_status, or null,
     "resolved": bool,
     "raised": "ExceptionType: message", only when grading raised (the harness then writes
               no report for the instance)}

tests/it/swebench_parity.rs runs it in a venv holding swebench 5.0.2 and compares with protege.
`swebench.harness/__init__.py` imports docker, modal and the run machinery, so that one package
module is a stub with the real directory as its path; every module that runs is the package's.
"""

import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

VERSION = "5.0.2"


def harness():
    found = importlib.metadata.version("swebench")
    if found != VERSION:
        sys.exit(f"swebench {found} installed, the parity corpus is for {VERSION}")
    root = Path(importlib.util.find_spec("swebench").submodule_search_locations[0])
    stub = types.ModuleType("swebench.harness")
    stub.__path__ = [str(root / "harness")]
    sys.modules["swebench.harness"] = stub
    from swebench.harness import constants, grading
    from swebench.types import TestSpec

    return constants, grading, TestSpec


def grade(case, log_path, constants, grading, TestSpec):
    spec = TestSpec(
        instance_id=case["name"],
        image="",
        eval_script_list=[],
        repo="",
        version="",
        FAIL_TO_PASS=case["FAIL_TO_PASS"],
        PASS_TO_PASS=case["PASS_TO_PASS"],
        log_parser=case["parser"],
        eval_type=case["eval_type"],
    )
    try:
        status_map, found = grading.get_logs_eval(spec, str(log_path))
    except Exception as e:  # the harness's run_instance turns this into an error instance
        return {"status_map": None, "tests_status": None, "resolved": False, "raised": f"{type(e).__name__}: {e}"}
    prediction = {"instance_id": spec.instance_id, "model_patch": "diff"}
    report = grading.get_eval_report(spec, prediction, str(log_path), include_tests_status=True)[spec.instance_id]
    tests_status = report.get("tests_status")
    if found:
        # get_eval_report must be get_eval_tests_report + get_resolution_status on that map.
        gold = {constants.FAIL_TO_PASS: spec.FAIL_TO_PASS, constants.PASS_TO_PASS: spec.PASS_TO_PASS}
        direct = grading.get_eval_tests_report(status_map, gold, eval_type=constants.EvalType(spec.eval_type))
        full = grading.get_resolution_status(direct) == constants.ResolvedStatus.FULL.value
        assert direct == tests_status and full == report["resolved"], case["name"]
    return {
        "status_map": [[k, v] for k, v in status_map.items()] if found else None,
        "tests_status": tests_status,
        "resolved": report["resolved"],
    }


def main():
    manifest = Path(sys.argv[1])
    constants, grading, TestSpec = harness()
    cases = json.loads(manifest.read_text(encoding="utf-8"))
    out = {c["name"]: grade(c, manifest.parent / c["log"], constants, grading, TestSpec) for c in cases}
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    print()


if __name__ == "__main__":
    main()
