"""nbgrader hooks and checks of the vitseg-lab course (copied into the course folder by
``python -m tools.grading build``; ``nbgrader_config.py`` imports it from there).

Only the standard library and nbformat/nbconvert are used, so the course folder works on any
machine that has nbgrader.

* ``preflight_submission`` — before autograde, per submitted notebook: keeps the first copy of a
  duplicated graded cell (nbgrader would fail the whole notebook with a misleading "old metadata
  format" error), puts back deleted locked cells (tests, read-only cells) where they belong, drops
  grading metadata it does not know, and writes a learner-facing note at the top of the notebook
  (it reaches the feedback) plus a JSON report for the instructor. It also **scans** every cell the
  learner could edit for patches of torch, numpy, builtins, the library or the grader, and for
  rebinding names the tests use; findings go to the report for manual review (the learner is not
  told). Original notebooks are kept under ``preflight/originals/``.
* ``drop_instructor_files_*`` — hooks that remove ``vitseg_lab/_grader`` from ``release/`` and
  ``feedback/`` (nbgrader copies every non-notebook file, GRADING.md §1.4).
* ``ScrubHiddenTracebacks`` — feedback preprocessor: any output line or traceback entry, in any
  cell, that quotes a hidden-test line is replaced, before ``ClearHiddenTests`` removes the lines
  from the source (§1.5). (The hidden block only records outputs — ``record("1.4", softmax)`` —
  the checks and references never enter the kernel, so there is nothing else to leak.)
"""

from __future__ import annotations

import ast
import copy
import glob
import json
import os
import re
import shutil
import uuid
from typing import Any

import nbformat

try:                                        # the course folder's copy of tools/edition.py
    import vitseg_edition as edition
except ImportError:                         # run from the repository (tests)
    from tools import edition

PREFLIGHT_KEY = "vitseg_preflight"          # notebook/cell metadata key of the grader's note
GRADER_DIR = os.path.join("vitseg_lab", "_grader")
HIDDEN_BEGIN, HIDDEN_END = edition.HIDDEN_BEGIN, edition.HIDDEN_END
hidden_lines = edition.hidden_lines
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ============================================================================ helpers on notebooks

def _nbg(cell: dict) -> dict | None:
    meta = cell.get("metadata", {}).get("nbgrader")
    return meta if isinstance(meta, dict) else None


def _gid(cell: dict) -> str | None:
    meta = _nbg(cell)
    return meta.get("grade_id") if meta else None


def _is_locked(meta: dict) -> bool:
    return bool(meta.get("locked")) or (bool(meta.get("grade")) and not meta.get("solution"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def course_root(start: str | None = None) -> str:
    """The course folder: where this module and nbgrader_config.py live."""
    return os.path.dirname(os.path.abspath(start or __file__))


# ================================================================================ preflight: fixes

def _restore_position(cells: list[dict], order: list[str], gid: str) -> int:
    """Index at which release cell ``gid`` belongs in ``cells``: right after the nearest
    preceding release cell present, else before the nearest following one, else at the end."""
    present = {_gid(c): i for i, c in enumerate(cells) if _gid(c) is not None}
    k = order.index(gid)
    for prev in reversed(order[:k]):
        if prev in present:
            return present[prev] + 1
    for nxt in order[k + 1:]:
        if nxt in present:
            return present[nxt]
    return len(cells)


def fix_structure(nb: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[dict]:
    """Repair the grading structure of a submitted notebook in place; returns the issues.

    Each issue: {"kind", "grade_id", "message"} where ``message`` is written for the learner.
    """
    issues: list[dict] = []
    rel_cells = {_gid(c): c for c in release.cells if _gid(c)}
    order = [_gid(c) for c in release.cells if _gid(c)]

    # 1. grading metadata that is not ours (empty, malformed, or a grade id of another notebook)
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", None)
        if meta is None:
            continue
        gid = meta.get("grade_id") if isinstance(meta, dict) else None
        if gid not in rel_cells:
            del cell.metadata["nbgrader"]
            if gid:
                issues.append({"kind": "unknown_cell", "grade_id": gid, "message": (
                    f"A cell carried the grading id '{gid}', which is not part of this "
                    "assignment (copied from another notebook?); it was run as an ordinary "
                    "cell.")})

    # 1b. our cells' grading metadata edited (grade/solution/lock flags, points, cell type): put
    #     back from the release. nbgrader restores points and locks itself, but a flipped grade or
    #     solution flag makes it fail the whole notebook ("Inconsistent checksums").
    for cell in nb.cells:
        gid = _gid(cell)
        if gid not in rel_cells:
            continue
        rel = rel_cells[gid]
        rmeta, meta = _nbg(rel) or {}, cell.metadata["nbgrader"]
        changed = [k for k in ("grade", "solution", "locked", "task", "points")
                   if bool(meta.get(k)) != bool(rmeta.get(k)) or (
                       k == "points" and rmeta.get("grade") and meta.get(k) != rmeta.get(k))]
        if cell.get("cell_type") != rel.get("cell_type"):
            changed.append("cell type")
            cell["cell_type"] = rel["cell_type"]
            if rel["cell_type"] == "code":
                cell.setdefault("outputs", [])
                cell.setdefault("execution_count", None)
            else:
                cell.pop("outputs", None)
                cell.pop("execution_count", None)
        if changed:
            cell.metadata["nbgrader"] = copy.deepcopy(rmeta)
            if _is_locked(rmeta):
                cell["source"] = rel.get("source", "")
            issues.append({"kind": "metadata", "grade_id": gid, "message": (
                f"The grading settings of cell '{gid}' were changed ({', '.join(changed)}); they "
                "were put back as released" + (", with the cell's original content" if _is_locked(
                    rmeta) else "") + ". Grading settings are not yours to edit.")})

    # 2. duplicated graded cells: keep the original (same cell id as the release, else the first)
    by_gid: dict[str, list[int]] = {}
    for i, cell in enumerate(nb.cells):
        gid = _gid(cell)
        if gid:
            by_gid.setdefault(gid, []).append(i)
    drop: set[int] = set()
    for gid, idxs in by_gid.items():
        if len(idxs) < 2:
            continue
        rel = rel_cells[gid]
        same_id = [i for i in idxs if nb.cells[i].get("id") and nb.cells[i].get("id") == rel.get("id")]
        keep = same_id[0] if len(same_id) == 1 else idxs[0]
        rmeta = _nbg(rel) or {}
        solution = bool(rmeta.get("solution"))
        for i in idxs:
            if i == keep:
                continue
            if solution:
                del nb.cells[i].metadata["nbgrader"]          # keep the learner's code
                for k in ("deletable", "editable"):
                    nb.cells[i].metadata.pop(k, None)
            else:
                drop.add(i)                                  # a copy of our cell: removed
        if solution:
            what = (f"The solution cell '{gid}' appears {len(idxs)} times (copied or split). "
                    f"Copy number {idxs.index(keep) + 1} is the graded solution cell; the other "
                    "copies ran as ordinary cells, in order, so the last definition before the "
                    "test is the one that was tested.")
        else:
            what = (f"The graded cell '{gid}' appears {len(idxs)} times (it was copied). nbgrader "
                    "cannot grade a notebook with a repeated grading id, so the original was "
                    "kept and graded and the copies were removed.")
        issues.append({"kind": "duplicate", "grade_id": gid, "message": what + (
            " Next time: delete the extra copies (Edit → Delete Cells), keep one cell per "
            "exercise, and press Validate before you submit.")})
    if drop:
        nb.cells = [c for i, c in enumerate(nb.cells) if i not in drop]

    # 3. deleted locked cells (tests, read-only set-up): put back where they belong
    present = {_gid(c) for c in nb.cells if _gid(c)}
    for gid in order:
        rmeta = _nbg(rel_cells[gid]) or {}
        if gid in present or not _is_locked(rmeta):
            if gid not in present:
                issues.append({"kind": "missing_solution", "grade_id": gid, "message": (
                    f"The solution cell '{gid}' was deleted; its test ran against whatever "
                    f"'{gid}' your other cells define. Keep the exercise's own cell next time.")})
            continue
        cell = copy.deepcopy(rel_cells[gid])
        cell["id"] = cell.get("id") or uuid.uuid4().hex[:12]
        nb.cells.insert(_restore_position(nb.cells, order, gid), cell)
        present.add(gid)
        issues.append({"kind": "restored", "grade_id": gid, "message": (
            f"The locked cell '{gid}' was missing from your notebook; it was put back in its "
            "place and graded. Locked cells cannot be skipped by deleting them.")})

    # 4. cell ids must be unique (nbformat 4.5); a hand-edited copy may repeat one
    seen: set[str] = set()
    for cell in nb.cells:
        cid = cell.get("id")
        if cid is not None and cid in seen:
            cell["id"] = uuid.uuid4().hex[:12]
        if cid is not None:
            seen.add(cell["id"])
    return issues


# ================================================================================ preflight: scan

WATCHED_MODULES = {
    "torch", "numpy", "builtins", "vitseg_lab", "json", "subprocess", "sys", "os", "importlib",
    "IPython", "ipykernel", "pickle", "math", "timm", "scipy", "functools", "inspect", "io",
    "tempfile", "pathlib", "unittest", "nbgrader", "nbformat", "operator", "warnings",
}
SHADOW_BUILTINS = {
    "AssertionError", "Exception", "BaseException", "isinstance", "issubclass", "abs", "all",
    "any", "print", "float", "int", "bool", "str", "len", "__import__", "getattr", "setattr",
    "hasattr", "open", "exec", "eval", "compile", "globals", "locals", "vars", "type", "super",
    "callable", "iter", "next", "range", "zip", "sum", "min", "max", "round", "sorted", "map",
    "__builtins__", "get_ipython",
}
_GRADER_NAMES = re.compile(
    r"_grader|_Verifier|__vitseg_|_ORIGINALS|\bunplug\b|set_custom_exc|_showtraceback|"
    r"\bsys\.modules\b|\bsys\.meta_path\b|\bsys\.path_hooks\b|NBGRADER_|\bimportlib\.reload\b|"
    r"\bunittest\.mock\b|\bfrom unittest import mock\b|\bmonkeypatch\b")
_REGEX_FALLBACK = re.compile(
    r"\b(torch|np|numpy|builtins|vitseg_lab|vl|json|subprocess|sys|os)\s*(\.\s*\w+)+\s*=[^=]|"
    r"\bsetattr\s*\(|\bdelattr\s*\(|__builtins__")


def _ipython_to_python(src: str) -> str:
    """Blank out IPython-only lines (magics, shell escapes, help) keeping line numbers."""
    out = []
    for line in src.splitlines():
        s = line.lstrip()
        if s.startswith(("%", "!", "?")) or s.endswith("?") and not s.startswith("#"):
            out.append(line[: len(line) - len(s)] + "pass")
        else:
            out.append(line)
    return "\n".join(out)


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # noqa: BLE001
        return "?"


class _Scanner(ast.NodeVisitor):
    def __init__(self, aliases: dict[str, str], test_names: dict[str, str]):
        self.aliases = dict(aliases)         # local name -> module it names (from imports)
        self.test_names = test_names         # module names the locked cells rely on
        self.findings: list[tuple[int, str]] = []
        self.depth = 0                       # > 0 inside a function/class body

    def flag(self, node: ast.AST, why: str) -> None:
        self.findings.append((getattr(node, "lineno", 0), why))

    def _module_of(self, node: ast.AST) -> str | None:
        root = _root_name(node)
        if root is None:
            return None
        mod = self.aliases.get(root)
        if mod is None and root in ("__builtins__",):
            return "builtins"
        return mod

    def _watched(self, mod: str | None) -> bool:
        return mod is not None and mod.split(".")[0] in WATCHED_MODULES

    # imports bind aliases; rebinding a name the tests use is a finding
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            local = a.asname or a.name.split(".")[0]
            mod = a.name if a.asname else a.name.split(".")[0]
            self._bind(node, local, mod)
            if a.name.split(".")[0] == "builtins" or a.name.startswith("unittest"):
                self.flag(node, f"imports {a.name}")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        for a in node.names:
            local = a.asname or a.name
            self._bind(node, local, f"{base}.{a.name}" if base else a.name)
            if base.startswith("vitseg_lab._grader") or a.name == "_grader":
                self.flag(node, "imports the instructor's grader")
            if base.startswith("unittest") or base == "builtins":
                self.flag(node, f"imports from {base}")
        self.generic_visit(node)

    def _bind(self, node: ast.AST, local: str, mod: str) -> None:
        if self.depth == 0 and local in self.test_names and self.test_names[local] != mod:
            self.flag(node, f"rebinds '{local}' (the tests use it as {self.test_names[local]})")
        if self.depth == 0:
            self.aliases[local] = mod

    def _target(self, t: ast.AST, node: ast.AST) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._target(e, node)
        elif isinstance(t, ast.Starred):
            self._target(t.value, node)
        elif isinstance(t, (ast.Attribute, ast.Subscript)):
            mod = self._module_of(t)
            if self._watched(mod):
                self.flag(node, f"assigns to {_dotted(t)} (module {mod})")
            elif _root_name(t) == "get_ipython":
                self.flag(node, f"patches IPython: {_dotted(t)}")
        elif isinstance(t, ast.Name) and self.depth == 0:
            if t.id in self.test_names:
                self.flag(node, f"rebinds '{t.id}' (the tests use it as {self.test_names[t.id]})")
                self.aliases.pop(t.id, None)
            elif t.id in SHADOW_BUILTINS:
                self.flag(node, f"shadows the builtin '{t.id}'")

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            self._target(t, node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._target(node.target, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._target(node.target, node)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        for t in node.targets:
            self._target(t, node)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self._target(node.target, node)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            if name in self.test_names or name in SHADOW_BUILTINS:
                self.flag(node, f"declares global '{name}' (a name the tests rely on)")
        self.generic_visit(node)

    def _def(self, node: ast.AST, name: str) -> None:
        if self.depth == 0 and (name in self.test_names or name in SHADOW_BUILTINS):
            self.flag(node, f"defines '{name}', replacing a name the tests rely on")
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._def(node, node.name)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._def(node, node.name)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._def(node, node.name)

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else None
        if name in ("setattr", "delattr") and node.args:
            mod = self._module_of(node.args[0])
            if self._watched(mod) or _root_name(node.args[0]) in ("get_ipython", "__builtins__"):
                self.flag(node, f"{name}() on {_dotted(node.args[0])}")
        if name in ("exec", "eval", "compile", "__import__"):
            self.flag(node, f"dynamic code: {name}()")
        if isinstance(fn, ast.Attribute):
            owner = _dotted(fn.value)
            if fn.attr in ("update", "setdefault", "__setitem__", "__setattr__", "pop",
                           "__delitem__", "clear") and re.search(
                    r"__dict__|__builtins__|\bvars\(|\bglobals\(|sys\.modules", owner):
                self.flag(node, f"mutates {owner}")
            if fn.attr in ("insert", "append", "extend", "remove") and owner in (
                    "sys.path", "sys.meta_path", "sys.path_hooks"):
                self.flag(node, f"changes {owner}")
            if owner in ("os.environ",) and fn.attr in ("pop", "update", "setdefault", "clear",
                                                        "__setitem__", "__delitem__"):
                self.flag(node, f"changes os.environ ({fn.attr})")
            if fn.attr in ("set_custom_exc", "register_magic_function", "run_cell",
                           "showtraceback", "_showtraceback", "register") and (
                    "get_ipython" in owner or "atexit" in owner):
                self.flag(node, f"hooks into IPython: {owner}.{fn.attr}()")
        self.generic_visit(node)


def _test_names(release: nbformat.NotebookNode) -> dict[str, str]:
    """Names the locked cells (tests, read-only) and the chapter's set-up cells import."""
    names: dict[str, str] = {}
    for cell in release.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_ipython_to_python(_source(cell)))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    names[a.asname or a.name.split(".")[0]] = (
                        a.name if a.asname else a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def scan_notebook(nb: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[dict]:
    """Findings for manual review: every cell the learner can edit, statement by statement."""
    findings: list[dict] = []
    test_names = _test_names(release)
    aliases: dict[str, str] = dict(test_names)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        meta = _nbg(cell)
        if meta and _is_locked(meta):
            continue                                  # restored from the gradebook anyway
        src = _source(cell)
        lines = src.splitlines()
        where = {"cell": index, "grade_id": (meta or {}).get("grade_id", "")}
        hits: list[tuple[int, str]] = []
        try:
            tree = ast.parse(_ipython_to_python(src))
        except SyntaxError:
            tree = None
        if tree is not None:
            sc = _Scanner(aliases, test_names)
            sc.visit(tree)
            aliases = sc.aliases
            hits += sc.findings
        else:
            for n, line in enumerate(lines, 1):
                if _REGEX_FALLBACK.search(line):
                    hits.append((n, "looks like a patch (cell does not parse)"))
        for n, line in enumerate(lines, 1):
            if not line.lstrip().startswith("#") and _GRADER_NAMES.search(line):
                hits.append((n, "touches the grader or the plug machinery"))
        seen: set[tuple[int, str]] = set()
        for n, why in sorted(hits):
            if (n, why) in seen:
                continue
            seen.add((n, why))
            findings.append(dict(where, line_no=n, line=lines[n - 1].strip() if 0 < n <= len(lines)
                                 else "", reason=why))
    return findings


# ============================================================================ preflight: per file

def _note_cell(issues: list[dict]) -> nbformat.NotebookNode:
    lines = ["**Note from the grader** (added when this notebook was graded)", ""]
    lines += [f"- {i['message']}" for i in issues]
    cell = nbformat.v4.new_markdown_cell("\n".join(lines))
    cell.metadata[PREFLIGHT_KEY] = {"issues": [i["kind"] for i in issues]}
    return cell


def release_notebook(root: str, assignment: str, name: str) -> nbformat.NotebookNode:
    path = os.path.join(root, "release", assignment, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m tools.grading build` first")
    return nbformat.read(path, as_version=4)


def preflight_notebook_file(path: str, release: nbformat.NotebookNode, originals: str) -> dict:
    """Fix one submitted notebook in place and scan it. Returns its report entry."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 - unreadable JSON: nbgrader will fail it; say why
        return {"issues": [{"kind": "unreadable", "grade_id": "", "message": (
            f"The notebook file could not be read ({type(e).__name__}); it scores 0. Make sure "
            "you submit the .ipynb file saved by Jupyter.")}], "findings": []}
    if any(PREFLIGHT_KEY in c.get("metadata", {}) for c in nb.cells):
        return {"issues": [], "findings": scan_notebook(nb, release), "already_done": True}
    before = nbformat.writes(nb)
    issues = fix_structure(nb, release)
    findings = scan_notebook(nb, release)
    if issues:                                       # every repair is explained to the learner
        nb.cells.insert(0, _note_cell(issues))
    after = nbformat.writes(nb)
    if after != before:
        os.makedirs(originals, exist_ok=True)
        keep = os.path.join(originals, os.path.basename(path))
        if not os.path.exists(keep):
            with open(keep, "w") as f:
                f.write(before)
        with open(path, "w") as f:
            f.write(after)
    return {"issues": issues, "findings": findings}


def preflight_submission(root: str, assignment: str, student: str,
                         notebooks: list[str] | None = None, rename: bool = True) -> dict:
    """Preflight every notebook of ``submitted/<student>/<assignment>/``; writes the report JSON.

    ``rename``: a submission whose only notebook has another name (``… (1).ipynb``,
    ``…-Copy1.ipynb``) is renamed to the expected name (nbgrader would skip it and give 0).
    Only safe before nbgrader lists the files, so the autograde hook passes ``rename=False``.
    """
    sub = os.path.join(root, "submitted", student, assignment)
    rel_dir = os.path.join(root, "release", assignment)
    expected = sorted(os.path.basename(p) for p in glob.glob(os.path.join(rel_dir, "*.ipynb")))
    report: dict[str, Any] = {"student": student, "assignment": assignment, "notebooks": {}}
    extra_issues: dict[str, list[dict]] = {}
    if rename:
        present = [os.path.basename(p) for p in glob.glob(os.path.join(sub, "*.ipynb"))]
        unknown = [p for p in present if p not in expected]
        missing = [e for e in expected if e not in present]
        if len(missing) == 1 and len(unknown) == 1:
            os.rename(os.path.join(sub, unknown[0]), os.path.join(sub, missing[0]))
            extra_issues[missing[0]] = [{"kind": "renamed", "grade_id": "", "message": (
                f"Your notebook was submitted as '{unknown[0]}'; it was graded as "
                f"'{missing[0]}'. Keep the original file name next time.")}]
    originals = os.path.join(root, "preflight", "originals", student, assignment)
    for name in expected:
        path = os.path.join(sub, name)
        if not os.path.exists(path):
            report["notebooks"][name] = {"issues": [{"kind": "missing", "grade_id": "", "message": (
                f"No notebook named '{name}' was submitted; it scores 0.")}], "findings": []}
            continue
        entry = preflight_notebook_file(path, release_notebook(root, assignment, name), originals)
        if extra_issues.get(name):
            entry["issues"] = extra_issues[name] + entry["issues"]
            nb = nbformat.read(path, as_version=4)
            note = [c for c in nb.cells if PREFLIGHT_KEY in c.get("metadata", {})]
            if note:
                nb.cells.remove(note[0])
            nb.cells.insert(0, _note_cell(entry["issues"]))
            nbformat.write(nb, path)
        report["notebooks"][name] = entry
    out = os.path.join(root, "reports", assignment, "preflight")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{student}.json")
    if any(e.get("already_done") for e in report["notebooks"].values()) and os.path.exists(path):
        return json.load(open(path))                 # keep the first (informative) report
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def autograde_preflight_hook(assignment: str, student: str, notebooks: list[str]) -> None:
    """``Autograde.pre_convert_hook``: runs per submission, so plain ``nbgrader autograde`` also
    gets the fixes. ``notebooks`` are the submitted paths (…/submitted/<id>/<assignment>/x.ipynb)."""
    if not notebooks:
        return
    sub = os.path.dirname(os.path.abspath(notebooks[0]))
    student_id = os.path.basename(os.path.dirname(sub))
    assignment_id = os.path.basename(sub)
    root = os.path.dirname(os.path.dirname(os.path.dirname(sub)))
    preflight_submission(root, assignment_id, student_id, rename=False)


# ======================================================================== release / feedback hooks

def _remove_grader_dirs(pattern: str) -> list[str]:
    removed = []
    for d in glob.glob(pattern):
        if os.path.isdir(d):
            shutil.rmtree(d)
            removed.append(d)
    return removed


def drop_instructor_files_from_release(assignment: str, student: str, notebooks: list[str]) -> None:
    """``GenerateAssignment.post_convert_hook``: release/<a>/ must not carry the grader."""
    _remove_grader_dirs(os.path.join(course_root(), "release", assignment, GRADER_DIR))


# What a feedback folder keeps: the learner's feedback pages, and nbgrader's timestamp.txt
# (`nbgrader release_feedback` reads it). Everything else nbgrader copied from autograded/ (the
# student-edition library, files the learner's notebook wrote, the grader's inputs) is removed.
FEEDBACK_KEEP = ("*.html", "timestamp.txt")


def strip_feedback_folder(folder: str) -> list[str]:
    """Remove everything in ``folder`` but the feedback pages and timestamp.txt; returns the
    removed paths (top level)."""
    import fnmatch

    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.islink(path) and os.path.isfile(path) and any(
                fnmatch.fnmatch(name, k) for k in FEEDBACK_KEEP):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(path)
    return removed


def drop_instructor_files_from_feedback(assignment: str, student: str, notebooks: list[str]) -> None:
    """``GenerateFeedback.post_convert_hook``: feedback/<s>/<a>/ holds the learner's feedback
    pages only (no grader, no copy of the library, nothing the kernel wrote)."""
    for folder in glob.glob(os.path.join(course_root(), "feedback", "*", assignment)):
        if os.path.isdir(folder):
            strip_feedback_folder(folder)


# ==================================================================== feedback: scrub tracebacks

try:
    from nbgrader.preprocessors import NbGraderPreprocessor as _Base
except Exception:  # noqa: BLE001 - importable without nbgrader (tests of the pure helpers)
    _Base = object  # type: ignore[assignment,misc]


def scrub_outputs(cell: dict, secrets: list[str]) -> int:
    """Replace traceback entries and output lines quoting a hidden line; returns how many."""
    if not secrets:
        return 0
    n = 0
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            tb = []
            for entry in out.get("traceback", []):
                plain = _ANSI.sub("", entry)
                if any(s in plain for s in secrets):
                    tb.append("(a hidden test failed here; its code is not shown)")
                    n += 1
                else:
                    tb.append(entry)
            out["traceback"] = tb
        elif out.get("output_type") == "stream":
            text = out.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            kept = [ln for ln in text.split("\n") if not any(s in ln for s in secrets)]
            if len(kept) != len(text.split("\n")):
                n += 1
                out["text"] = "\n".join(kept)
        elif isinstance(out.get("data"), dict):              # execute_result, display_data
            for mime, val in list(out["data"].items()):
                text = "".join(val) if isinstance(val, list) else val
                if not isinstance(text, str) or not any(s in text for s in secrets):
                    continue
                n += 1
                out["data"][mime] = "\n".join(
                    ln for ln in text.split("\n") if not any(s in ln for s in secrets))
    return n


class ScrubHiddenTracebacks(_Base):  # type: ignore[misc,valid-type]
    """Feedback preprocessor (before ClearHiddenTests): no output of *any* cell may quote a line
    of any hidden block of the notebook (a learner's cell can print the kernel's input history,
    which holds every test cell as executed)."""

    def preprocess(self, nb, resources):
        secrets = sorted({s for c in nb.cells if c.get("cell_type") == "code"
                          for s in hidden_lines(_source(c)) if len(s) >= 4})
        for cell in nb.cells:
            if cell.get("cell_type") == "code":
                scrub_outputs(cell, secrets)
        return nb, resources


# ==================================================================== feedback: math, offline

# A formula in a markdown cell: $$display$$ or $inline$ (not \$, not inside `code`).
_MATH = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<![\\$])\$(?!\s)((?:\\.|[^$\\\n]|\n(?!\s*\n))+?)"
                   r"(?<!\s)(?<!\\)\$(?!\d)", re.DOTALL)
_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$|(`+)(?:.+?)\2", re.DOTALL | re.MULTILINE)
# characters markdown acts on inside a line, as entities (MathML text never starts a line)
_MD_SPECIAL = {c: f"&#{ord(c)};" for c in "*_`[]~|$\\"}
_MD_SPECIAL.update({"<": "&lt;", ">": "&gt;"})


def _md_safe(text: str) -> str:
    """Entity-escape the characters markdown would act on (in MathML text nodes)."""
    return "".join(_MD_SPECIAL.get(ch, ch) for ch in text)


def tex_to_html(tex: str, display: bool) -> str:
    """One formula as MathML (latex2mathml), safe to leave inside markdown; a formula it cannot
    convert (or no latex2mathml) is shown as its TeX source in <code>, never as a script."""
    try:
        from latex2mathml.converter import convert

        mathml = convert(tex.strip(), display="block" if display else "inline")
    except Exception:  # noqa: BLE001 - any conversion failure: show the source instead
        body = _md_safe(tex.replace("&", "&amp;")).replace("\n", " ")
        return f'<code class="vitseg-tex">{body}</code>'
    mathml = mathml.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', "")
    # text between tags: entities for what markdown would read as emphasis, links, escapes
    mathml = re.sub(r">([^<]+)<", lambda m: ">" + _md_safe(m.group(1)) + "<", mathml)
    return mathml.replace("\n", " ")


def prerender_math(markdown: str) -> tuple[str, int]:
    """Every $…$ / $$…$$ of a markdown text (outside code) as MathML; returns (text, count)."""
    out, n, last = [], 0, 0

    def convert(chunk: str) -> str:
        nonlocal n

        def one(m: re.Match) -> str:
            nonlocal n
            n += 1
            if m.group(1) is not None:
                return tex_to_html(m.group(1), display=True)
            return tex_to_html(m.group(2), display=False)

        return _MATH.sub(one, chunk)

    for m in _CODE.finditer(markdown):
        out.append(convert(markdown[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(convert(markdown[last:]))
    return "".join(out), n


class PrerenderMath(_Base):  # type: ignore[misc,valid-type]
    """Feedback preprocessor: the math of markdown cells (and text/markdown or text/latex
    outputs) becomes MathML, which every current browser draws without a script. The feedback
    template (templates/vitseg_feedback) loads no MathJax: the page works offline."""

    def preprocess(self, nb, resources):
        for cell in nb.cells:
            if cell.get("cell_type") == "markdown":
                cell["source"], _ = prerender_math(_source(cell))
            for out in cell.get("outputs", []):
                data = out.get("data") if isinstance(out, dict) else None
                if not isinstance(data, dict):
                    continue
                if "text/markdown" in data:
                    text = data["text/markdown"]
                    data["text/markdown"], _ = prerender_math(
                        "".join(text) if isinstance(text, list) else text)
                if "text/latex" in data and "text/html" not in data:
                    text = data["text/latex"]
                    text = "".join(text) if isinstance(text, list) else text
                    html, k = prerender_math(text)
                    data["text/html"] = html if k else tex_to_html(text.strip("$"), True)
        return nb, resources
