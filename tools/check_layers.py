#!/usr/bin/env python3
"""Fail when an import runs upward or a cycle appears between the top-level modules of a crate.

For each crate (a `src/` directory with `lib.rs`), every `crate::NAME` path and every
`super::` path that climbs out of a top-level module is an edge from the module the file
belongs to (its first directory or file under src/) to NAME. Each crate's modules are placed
in layers below (lowest first); an edge to a higher layer, a module in no layer, or a cycle
between two or more top-level modules is reported with its file:line, and the script exits 1.
(The engine crate cannot import the application crate at all: Cargo sees to that.)

Usage: tools/check_layers.py [--graph] [SRC_DIR ...]   (default: every crate in the workspace)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `use crate::{a, b::{c, d}}` names several top modules at once (here a and b).
CRATE_GROUP = re.compile(r"\bcrate::\{")
SUPER_PATH = re.compile(r"\b((?:super::)+)([a-z_][a-z0-9_]*)")
SUPER_GROUP = re.compile(r"\b((?:super::)+)\{")
# Ways to name a module the path patterns above would not see: refused outright.
EVASIONS = re.compile(r"\bcrate\s+as\b|\bextern\s+crate\s+self\b|#\[path\b")


# Lowest layer first. A module may import from its own layer (when that makes no cycle) and
# from the layers below it, never from above.
LAYERS = {
    "crates/engine/src": [
        ["util", "inputs"],
        ["backend", "chat"],
        ["model", "chat_template"],
        ["tokenizer"],
        ["generate"],
    ],
    "src": [
        ["interrupt", "tensorboard", "sandbox", "swebench"],  # no knowledge of tasks or models
        ["tasks"],  # one task: its fields, grading, protection
        ["agent"],  # the harness: episode, policy, tools, experts, trajectories
        ["executor", "reward"],  # where episodes run; how they are scored
        ["config", "eval", "serve", "suites"],
        ["train", "synth", "diagnostics", "launch"],
        ["report", "pipeline"],
        ["cli"],  # parses arguments and dispatches
    ],
}


def group_heads(text, start):
    """The first path segment of each item of the brace group opening just before `start`."""
    heads, depth, item = [], 0, ""
    for ch in text[start:]:
        if depth == 0 and ch in ",}":
            m = re.match(r"\s*([a-z_][a-z0-9_]*)", item)
            if m:
                heads.append(m.group(1))
            if ch == "}":
                return heads
            item = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        item += ch
    return heads


def label(path):
    """A path as reports show it: relative to the repository when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def strip_comments(text):
    """Drop // comments (doc comments included), char and string literals, keeping line numbers;
    `a :: b` is read as `a::b`."""
    out = []
    for line in text.split("\n"):
        line = re.sub(r"'(?:[^'\\]|\\.)'", "' '", line)
        line = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)
        line = re.sub(r"[ \t]*::[ \t]*", "::", line)
        i = line.find("//")
        out.append(line if i < 0 else line[:i])
    return "\n".join(out)


def module_path(src, file):
    """The module path of a file under src/: src/a/b.rs -> [a, b]; src/a/mod.rs -> [a]."""
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def top_modules(src):
    return {
        p.stem if p.is_file() else p.name
        for p in src.iterdir()
        if (p.is_file() and p.suffix == ".rs" and p.stem not in ("lib", "main")) or p.is_dir()
    }


def edges(src, evasions=None):
    """Top-level modules and the edges between them; aliasing tricks go to `evasions`."""
    tops = top_modules(src)
    found = {}
    evasions = [] if evasions is None else evasions
    for file in sorted(src.rglob("*.rs")):
        mod = module_path(src, file)
        if not mod:
            continue  # lib.rs / main.rs: the crate root may name every module
        me = mod[0]
        text = strip_comments(file.read_text())
        line_of = lambda pos: text.count("\n", 0, pos) + 1
        hits = [(m.group(1), m.start()) for m in CRATE_PATH.finditer(text)]
        for g in CRATE_GROUP.finditer(text):
            for name in group_heads(text, g.end()):
                hits.append((name, g.start()))
        for m in SUPER_PATH.finditer(text):
            # `super` climbs from the file's module (an inline `mod` only adds depth, so this
            # errs towards seeing an edge, never towards missing one).
            if m.group(1).count("super::") >= len(mod):
                hits.append((m.group(2), m.start()))
        for m in SUPER_GROUP.finditer(text):
            if m.group(1).count("super::") >= len(mod):
                hits.extend((name, m.start()) for name in group_heads(text, m.end()))
        for m in EVASIONS.finditer(text):
            hits.append(("<evasion>", m.start()))
        for name, pos in hits:
            if name == "<evasion>":
                evasions.append(f"{label(file)}:{line_of(pos)}")
            elif name in tops and name != me:
                found.setdefault((me, name), f"{label(file)}:{line_of(pos)}")
    return tops, found


def cycles(tops, found):
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {t: sorted(b for (a, b) in found if a == t) for t in tops}
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for t in sorted(tops):
        if t not in index:
            visit(t)
    return comps


def crates():
    found = [ROOT / "src"] if (ROOT / "src" / "lib.rs").exists() else []
    found += sorted(p.parent for p in ROOT.glob("crates/*/src/lib.rs"))
    return found


def self_test():
    """The checker finds a cycle, an upward import and an unplaced module in a made-up crate."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "lib.rs").write_text("pub mod low;\npub mod high;\npub mod stray;\n")
        (src / "low.rs").write_text("use crate::high::Thing; // upward\n")
        (src / "high").mkdir()
        (src / "high" / "mod.rs").write_text("pub struct Thing;\nmod inner;\n")
        (src / "high" / "inner.rs").write_text("use super::super::low::*;\n/// crate::stray in a comment is no edge\n")
        (src / "stray.rs").write_text("use crate::{high::{Thing, Other}, low};\n")
        (src / "high" / "inner.rs").write_text(
            "use super::super::low::*;\n/// crate::stray in a comment is no edge\n"
            "fn f(c: char) -> bool { c == '\"' && crate :: stray::X && \"x\" == \"\" }\n"
        )
        (src / "low2.rs").write_text("use super::{stray::A};\nuse crate as root;\n")
        tops, found = edges(src)
        evasions = []
        tops, found = edges(src, evasions)
        want = {("low", "high"), ("high", "low"), ("stray", "high"), ("stray", "low"), ("high", "stray"), ("low2", "stray")}
        assert set(found) == want, found
        assert len(evasions) == 1, evasions
        assert cycles(tops, found) == [["high", "low", "stray"]], cycles(tops, found)
        key = label(src)
        LAYERS[key] = [["low", "low2"], ["high"]]
        try:
            # the cycle, the upward import low -> high, the unplaced `stray`, `crate as`
            assert check([src]) == 4
        finally:
            del LAYERS[key]
    print("check_layers self-test passed")


def main(argv):
    if "--self-test" in argv:
        self_test()
        argv = [a for a in argv if a != "--self-test"]
    show = "--graph" in argv
    srcs = [Path(a).resolve() for a in argv if not a.startswith("--")] or crates()
    bad = check(srcs, show)
    if bad:
        print(f"{bad} layering error(s): move the item to the lower module, or to a shared one")
        return 1
    print(f"no upward imports and no import cycles between top-level modules ({', '.join(str(label(s)) for s in srcs)})")
    return 0


def check(srcs, show=False):
    bad = 0
    for src in srcs:
        evasions = []
        tops, found = edges(src, evasions)
        for where in evasions:
            bad += 1
            print(f"{where}: `crate as`, `extern crate self` or `#[path]` hides which module is named: not allowed")
        layers = LAYERS.get(label(src))
        if layers is not None:
            level = {m: i for i, row in enumerate(layers) for m in row}
            for m in sorted(tops - level.keys()):
                bad += 1
                print(f"{label(src)}: module `{m}` is in no layer: add it to LAYERS in {Path(__file__).name}")
            for (a, b), where in sorted(found.items()):
                if a in level and b in level and level[b] > level[a]:
                    bad += 1
                    print(f"upward import: {a} (layer {level[a]}) -> {b} (layer {level[b]}) at {where}")
        if show:
            for (a, b), where in sorted(found.items()):
                print(f"{label(src)}: {a} -> {b}   ({where})")
        for comp in cycles(tops, found):
            bad += 1
            members = set(comp)
            print(f"import cycle in {label(src)} between: {', '.join(comp)}")
            for (a, b), where in sorted(found.items()):
                if a in members and b in members:
                    print(f"    {a} -> {b}   first at {where}")
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
