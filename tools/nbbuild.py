"""Build the chapter notebooks from their sources in ``notebooks/src/*.py``.

The library is the single source of truth for every exercise: a ``[solution]`` cell is generated
from the function's source in ``vitseg_lab/<module>.py`` (markers included), so the notebook's
reference solution and the library's are the same code by construction.

Source format (a percent-script, one cell per ``# %%`` header)::

    # %% [markdown]
    # # Title            <- markdown lines, "# " stripped ("#" alone is a blank line)
    # %%                 <- plain code cell
    # %% [readonly]      <- code cell locked by nbgrader
    # %% [solution] attention.softmax          <- generated: "@plug(attention)" + the library function
    # %% [test] softmax_test points=10         <- autograded cell with points; the builder appends
                                                 the hidden block (``record(tag, fn)``) for the
                                                 exercise of the [solution] cell above it
    # %% tags=long-running,nbval-skip          <- tags may follow any header

Run ``python -m tools.nbbuild`` to rewrite ``notebooks/*.ipynb``; ``--check`` exits 1 when a
committed notebook differs from its source (the test suite runs this).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from pathlib import Path

import nbformat

from tools.edition import HIDDEN_BEGIN, hidden_block, tag_of_docstring

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"
_HEADER = re.compile(r"^# %%(?P<rest>.*)$")


def function_source(module: str, name: str) -> str:
    """The source text of ``vitseg_lab/<module>.py::name`` (read with ast, no import)."""
    path = ROOT / "vitseg_lab" / f"{module.replace('.', '/')}.py"
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            lines = text.splitlines()
            end = node.end_lineno
            body = "\n".join(lines[node.lineno - 1 : end])
            # The closing marker is a comment after the last statement, outside the AST node.
            if "### BEGIN SOLUTION" in body and "### END SOLUTION" not in body:
                while end < len(lines) and "### END SOLUTION" not in lines[end]:
                    end += 1
                if end == len(lines):
                    raise SystemExit(f"{path}: {name} has BEGIN SOLUTION but no END SOLUTION")
                end += 1
            return "\n".join(lines[node.lineno - 1 : end])
    raise SystemExit(f"{path}: no top-level function {name!r} (named by a [solution] cell)")


def exercise_tag_of(module: str, name: str) -> str:
    """The ``"1.4"`` of ``vitseg_lab/<module>.py::name`` (its docstring's ``Exercise 1.4 · ...``)."""
    path = ROOT / "vitseg_lab" / f"{module.replace('.', '/')}.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            tag = tag_of_docstring(ast.get_docstring(node))
            if tag:
                return tag
    raise SystemExit(f"{path}: {name} has no 'Exercise N.M · ...' docstring (named by a "
                     "[solution] cell)")


def _meta(kind: str, grade_id: str, points: int | None = None) -> dict:
    base = {"schema_version": 3, "grade_id": grade_id, "task": False}
    if kind == "solution":
        return dict(base, grade=False, solution=True, locked=False)
    if kind == "test":
        return dict(base, grade=True, solution=False, locked=True, points=points)
    return dict(base, grade=False, solution=False, locked=True)  # readonly


def parse(src: Path) -> list[dict]:
    """Split a source file into cell dicts: kind, args, tags, body lines."""
    cells: list[dict] = []
    for line in src.read_text().splitlines():
        m = _HEADER.match(line)
        if m:
            rest = m.group("rest").strip()
            tags: list[str] = []
            tm = re.search(r"tags=(\S+)", rest)
            if tm:
                tags = tm.group(1).split(",")
                rest = (rest[: tm.start()] + rest[tm.end():]).strip()
            km = re.match(r"\[(\w+)\]\s*(.*)", rest)
            kind, args = (km.group(1), km.group(2).split()) if km else ("code", [])
            cells.append({"kind": kind, "args": args, "tags": tags, "body": []})
        elif cells:
            cells[-1]["body"].append(line)
    return cells


def _strip(body: list[str]) -> str:
    while body and not body[-1].strip():
        body = body[:-1]
    while body and not body[0].strip():
        body = body[1:]
    return "\n".join(body)


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                       "name": "python3"},
        "language_info": {"name": "python"},
    }
    seen: set[str] = set()
    exercise: tuple[str, str] | None = None      # (tag, function name) of the last [solution]
    for i, c in enumerate(parse(src)):
        kind, args, tags = c["kind"], c["args"], c["tags"]
        if kind == "markdown":
            text = "\n".join(re.sub(r"^# ?", "", ln) for ln in c["body"])
            cell = nbformat.v4.new_markdown_cell(_strip(text.splitlines()))
        else:
            body = _strip(c["body"])
            cell = nbformat.v4.new_code_cell(body)
            if kind == "solution":
                module, name = args[0].rsplit(".", 1)
                fn = function_source(module, name)
                cell.source = f"@plug({module.split('.')[-1]})\n{fn}" + (f"\n\n{body}" if body else "")
                cell.metadata["nbgrader"] = _meta("solution", name)
                gid = name
                exercise = (exercise_tag_of(module, name), name)
            elif kind == "test":
                gid = args[0]
                if HIDDEN_BEGIN in body:
                    raise SystemExit(f"{src}: [test] {gid} writes its own hidden block; the "
                                     "builder adds it from the [solution] cell above")
                if exercise is None:
                    raise SystemExit(f"{src}: [test] {gid} has no [solution] cell before it")
                cell.source = body + "\n" + hidden_block(*exercise)
                exercise = None
                points = int(next(a for a in args if a.startswith("points=")).split("=")[1])
                cell.metadata["nbgrader"] = _meta("test", gid, points)
            elif kind == "readonly":
                gid = args[0] if args else f"readonly_{i}"
                cell.metadata["nbgrader"] = _meta("readonly", gid)
            elif kind != "code":
                raise SystemExit(f"{src}: unknown cell kind [{kind}]")
            if kind in ("solution", "test", "readonly"):
                if gid in seen:
                    raise SystemExit(f"{src}: grade id {gid!r} used twice")
                seen.add(gid)
        if tags:
            cell.metadata["tags"] = tags
        # Stable ids so a rebuild of an unchanged source is byte-identical.
        cell.id = hashlib.sha1(f"{src.stem}:{i}".encode()).hexdigest()[:12]
        nb.cells.append(cell)
    return nb


def dumps(nb: nbformat.NotebookNode) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a notebook is out of date")
    ap.add_argument("names", nargs="*", help="source stems to build (default: all)")
    a = ap.parse_args(argv)
    stale = []
    for src in sorted(SRC.glob("*.py")):
        if a.names and src.stem not in a.names:
            continue
        out = OUT / f"{src.stem}.ipynb"
        text = dumps(build(src))
        if a.check:
            if not out.exists() or out.read_text() != text:
                stale.append(out.name)
        else:
            out.write_text(text)
            print(f"wrote {out.relative_to(ROOT)}")
    if stale:
        print("out of date (run `python -m tools.nbbuild`): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
