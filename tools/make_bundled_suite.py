#!/usr/bin/env python3
"""Build the bundled task suite data/tasks/ from the hand-written packages in tools/suite_src/.

Usage:
    tools/make_bundled_suite.py [--src tools/suite_src] [--out data/tasks]

Each tools/suite_src/<package>/ holds a small pure-Python package with its CORRECT code and
visible tests, plus tasks.json: a list of bugs, each as exact text edits (correct -> buggy),
a bug report, hidden test files and the FAIL_TO_PASS ids (see tools/suite_src/README.md).
For every task this script:

  1. uses the package's clean snapshot <out>/repos/<package>/ (no hidden tests, no tasks.json;
     one per package) and makes `env.base_patch` (correct -> buggy: the bug the agent starts
     from), `patch` (buggy -> correct) and `test_patch` (adds the hidden tests) with git;
  2. runs pytest on the buggy tree to find PASS_TO_PASS (the visible tests that pass with the bug),
     and checks that FAIL_TO_PASS fail with the bug and pass with the fix;
  3. writes the instance to <out>/train.jsonl or <out>/test.jsonl (by the task's split).

The output is deterministic, so re-running it on unchanged sources changes nothing. Needs git
and pytest (`python3 -m pytest`).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

TEST_CMD = "python3 -m pytest -rA -p no:cacheprovider"


def run(cmd, cwd, check=True):
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} in {cwd} failed:\n{p.stdout}")
    return p.stdout


def git(cwd, *args):
    env = ["-c", "user.name=protege", "-c", "user.email=protege@localhost", "-c", "core.autocrlf=false"]
    return run(["git", *env, *args], cwd)


def copy_package(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tasks.json", "__pycache__", "*.pyc", ".pytest_cache"))


def apply_edits(root, edits, forward, where):
    for e in edits:
        path = os.path.join(root, e["file"])
        with open(path, encoding="utf-8") as f:
            text = f.read()
        old, new = (e["correct"], e["buggy"]) if forward else (e["buggy"], e["correct"])
        if text.count(old) != 1:
            sys.exit(f"error: {where}: {e['file']}: the text to replace occurs {text.count(old)} times (need exactly 1):\n{old}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))


def pytest_results(root):
    out = run(TEST_CMD.split(), root, check=False)
    results = {}
    for line in out.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR) (\S+)", line)
        if m:
            results[m.group(2)] = m.group(1)
    return results, out


def tree_hash(root):
    h = hashlib.sha1()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(d, name)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def build_task(pkg, src, task, out_dir):
    where = f"{pkg}/tasks.json:{task['id']}"
    iid = f"{pkg}__{task['id']}"
    snapshot = os.path.join(out_dir, "repos", pkg)
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "w")
        copy_package(snapshot, work)
        git(work, "init", "-q")
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", "clean")
        apply_edits(work, task["edits"], True, where)
        base_patch = git(work, "diff", "--no-color")
        git(work, "commit", "-q", "-am", "base")
        apply_edits(work, task["edits"], False, where)
        patch = git(work, "diff", "--no-color")
        git(work, "checkout", "-q", ".")
        for rel, text in sorted(task["hidden_tests"].items()):
            with open(os.path.join(work, rel), "w", encoding="utf-8") as f:
                f.write(text)
        git(work, "add", "-A")
        test_patch = git(work, "diff", "--cached", "--no-color")
        # With the bug and the hidden tests: FAIL_TO_PASS fail; the passing visible tests are PASS_TO_PASS.
        before, log = pytest_results(work)
        f2p = task["fail_to_pass"]
        bad = [t for t in f2p if before.get(t) == "PASSED"]
        if bad:
            sys.exit(f"error: {where}: FAIL_TO_PASS tests pass with the bug: {bad}\n{log}")
        hidden = set()
        for rel in task["hidden_tests"]:
            hidden.update(t for t in before if t.startswith(rel + "::"))
        extra = sorted(t for t in hidden if t not in f2p)
        if extra:
            sys.exit(f"error: {where}: hidden tests not in fail_to_pass: {extra}")
        p2p = sorted(t for t, s in before.items() if s == "PASSED" and t not in hidden)
        visible_failing = sorted(t for t, s in before.items() if s != "PASSED" and t not in hidden)
        if visible_failing:
            sys.exit(f"error: {where}: visible tests fail with the bug (they would give it away): {visible_failing}")
        apply_edits(work, task["edits"], False, where)
        after, log = pytest_results(work)
        failing = sorted(t for t in f2p + p2p if after.get(t) != "PASSED")
        if failing:
            sys.exit(f"error: {where}: tests fail with the fix: {failing}\n{log}")
    files = sorted({e["file"] for e in task["edits"]})
    lines = sum(1 for l in patch.splitlines() if l[:1] in "+-" and not l.startswith(("+++", "---")))
    return {
        "instance_id": iid,
        "repo": f"protege/{pkg}",
        "base_commit": tree_hash(snapshot)[:12],
        "problem_statement": task["problem_statement"].strip() + "\n",
        "patch": patch,
        "test_patch": test_patch,
        "FAIL_TO_PASS": f2p,
        "PASS_TO_PASS": p2p,
        "env": {"repo_path": f"repos/{pkg}", "setup": [], "test_cmd": TEST_CMD, "base_patch": base_patch},
        "split": task["split"],
        "difficulty": {"files_changed": len(files), "lines_changed": lines},
        "provenance": {"package": pkg, "source": "hand-written (tools/suite_src)", "bug": task["id"]},
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.path.join(here, "suite_src"))
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "tasks"))
    a = ap.parse_args()
    packages = sorted(p for p in os.listdir(a.src) if os.path.isfile(os.path.join(a.src, p, "tasks.json")))
    if not packages:
        sys.exit(f"error: no package with a tasks.json under {a.src}")
    os.makedirs(os.path.join(a.out, "repos"), exist_ok=True)
    splits = {"train": [], "test": []}
    for pkg in packages:
        src = os.path.join(a.src, pkg)
        snapshot = os.path.join(a.out, "repos", pkg)
        if os.path.exists(snapshot):
            shutil.rmtree(snapshot)
        copy_package(src, snapshot)
        with open(os.path.join(src, "tasks.json"), encoding="utf-8") as f:
            tasks = json.load(f)
        for t in tasks:
            if t.get("split") not in splits:
                sys.exit(f"error: {pkg}/tasks.json:{t.get('id')}: split must be train or test")
            inst = build_task(pkg, src, t, a.out)
            splits[t["split"]].append(inst)
            print(f"{inst['instance_id']:45} {t['split']:5} F2P {len(inst['FAIL_TO_PASS'])} P2P {len(inst['PASS_TO_PASS'])}")
    keep = set(packages)
    for name in os.listdir(os.path.join(a.out, "repos")):
        if name not in keep:
            shutil.rmtree(os.path.join(a.out, "repos", name))
    for split, items in splits.items():
        tmp = os.path.join(a.out, f"{split}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for inst in sorted(items, key=lambda i: i["instance_id"]):
                f.write(json.dumps(inst) + "\n")
        os.replace(tmp, os.path.join(a.out, f"{split}.jsonl"))
    print(f"{len(splits['train'])} train and {len(splits['test'])} test tasks from {len(packages)} packages in {a.out}")


if __name__ == "__main__":
    main()
