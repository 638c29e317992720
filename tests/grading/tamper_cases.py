"""Hostile chapter-01 submissions for the tamper suite (test_tamper.py), grouped so that one
nbgrader run grades every attack class of issue #11.

Each builder returns ``(notebook, attacked)``: the set of solution grade ids whose exercise the
attacks try to win (they must score 0; every other exercise is honest and must keep full marks).

Most attacked solutions are *right while the visible tests run and wrong while the hidden block
records* (``_vt_in_hidden`` walks the call stack): the visible tests pass, so only the hidden
verdict — computed in nbgrader's process after the kernel is gone — stands between the attack and
the points.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat

from tools import grading as g

ROOT = Path(__file__).resolve().parents[2]

# A scratch cell put before the first exercise of every tamper learner.
HELPERS = '''\
import sys as _vt_sys

def _vt_in_hidden():
    """True while vitseg_lab.recorder is calling us (the hidden block), False in visible tests."""
    f = _vt_sys._getframe(1)
    while f is not None:
        if "recorder" in f.f_code.co_filename or f.f_code.co_name in ("record", "record_outputs"):
            return True
        f = f.f_back
    return False
'''


def _cells(nb) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade_id")}


def _wrong_in_hidden(cell, wrong: str) -> None:
    """Keep the reference body, but return ``wrong`` while the hidden block records."""
    lines = cell.source.splitlines()
    end = g.docstring_end(lines)
    cell.source = "\n".join(lines[:end] + [f"    if _vt_in_hidden():\n        return {wrong}"]
                            + lines[end:])


NOISE = """\
    import warnings
    import tqdm
    warnings.warn("a learner's UserWarning inside a graded cell", UserWarning)
    for _ in tqdm.tqdm(range(3)):
        pass"""


def make_noisy(cell) -> None:
    """A correct solution that emits a UserWarning and a plain tqdm bar (on stderr) each call."""
    lines = cell.source.splitlines()
    end = g.docstring_end(lines)
    cell.source = "\n".join(lines[:end] + [NOISE] + lines[end:])


def noisy_reference(course: Path):
    """The reference chapter 01 with a noisy (correct) softmax: full marks from Validate and
    from autograde alike."""
    nb = g.reference_submission(course, "ch01")
    make_noisy(_cells(nb)["softmax"])
    return nb


def _insert_before(nb, gid: str, *sources: str) -> None:
    at = nb.cells.index(_cells(nb)[gid])
    for k, src in enumerate(sources):
        nb.cells.insert(at + k, nbformat.v4.new_code_cell(src))


def _append(nb, *sources: str) -> None:
    for src in sources:
        nb.cells.append(nbformat.v4.new_code_cell(src))


def _base(course: Path):
    nb = g.reference_submission(course, "ch01")
    _insert_before(nb, "patchify", HELPERS)
    return nb


# ----------------------------------------------------------------------------- in-kernel verdicts

def verdict_attacks(course: Path):
    """Patching what reads the verdict, replacing a check's ``__code__``, ``sys._getframe``,
    emptying the cases, a tensor subclass with lying comparisons, importing the references."""
    nb = _base(course)
    c = _cells(nb)
    # 1.1: patch every reader of the records the kernel can reach, directly and indirectly
    _wrong_in_hidden(c["patchify"], "images.reshape(images.shape[0], -1, 1)")
    c["patchify"].source += '''

import json, builtins, importlib
import vitseg_lab.recorder as _rec
_vt_saved = (json.loads, json.load, _rec.load, _rec.decode)
# (json.loads itself is left alone: the kernel's own messaging needs it)
setattr(__import__("js" + "on"), "load", lambda *a, **k: {"ok": True})
_rec.load = lambda *a, **k: {"tag": "1.1", "rows": "PASSED"}
_rec.decode = lambda *a, **k: "PASSED"
try:
    importlib.import_module("vitseg_lab._grader.common").verdict = lambda *a, **k: None
except ImportError as e:
    print("grader not importable:", type(e).__name__)
try:
    importlib.import_module("vitseg_lab._grader.autograde").ApplyVerdicts.verdict = staticmethod(
        lambda *a, **k: None)
except ImportError as e:
    print("grader not importable:", type(e).__name__)'''
    # (the patches are undone after 1.1's test, so that the honest exercises can record)
    _insert_before(nb, "embed_tokens",
                   "json.loads, json.load, _rec.load, _rec.decode = _vt_saved")
    # 1.2: replace the recording function's __code__ (every row "correct": the inputs back)
    _wrong_in_hidden(c["embed_tokens"], "patches")
    c["embed_tokens"].source += '''

import vitseg_lab.recorder as _rec2
_vt_code = _rec2.record_outputs.__code__
def _fake(fn, cases, substitutes=None):
    return [{"out": case[next(iter(case))], "after": case} for case in cases]
_rec2.record_outputs.__code__ = _fake.__code__'''
    _insert_before(nb, "resize_pos_embed", "_rec2.record_outputs.__code__ = _vt_code")
    # 1.3: reach into the recorder's frame (sys._getframe) and empty the grader's list of cases
    _wrong_in_hidden(c["resize_pos_embed"], "_vt_empty_cases(pos_embed)")
    _insert_before(nb, "resize_pos_embed", '''\
def _vt_empty_cases(x):
    f = _vt_sys._getframe(1)
    while f is not None:
        for name in ("cases", "rows"):
            v = f.f_locals.get(name)
            if isinstance(v, list):
                v.clear()
        f = f.f_back
    return x''')
    # 1.4 stays honest. 1.5: use the naive reference of the grader, if it can be imported or read
    _insert_before(nb, "multi_head_attention", f'''\
_vt_ref = None
try:
    from vitseg_lab._grader.ch01 import naive_multi_head_attention as _vt_ref
except ImportError as e:
    print("import refused:", type(e).__name__)
for _p in ({str(ROOT / "vitseg_lab" / "_grader" / "ch01.py")!r}, "../../../source/ch01/vitseg_lab/_grader/ch01.py"):
    try:
        _ns = {{}}
        exec(open(_p).read(), _ns)
        _vt_ref = _ns["naive_multi_head_attention"]
    except Exception as e:
        print("read refused:", type(e).__name__)''')
    _wrong_in_hidden(c["multi_head_attention"],
                     "(_vt_ref(x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, "
                     "proj_weight=proj_weight, proj_bias=proj_bias, num_heads=num_heads) "
                     "if _vt_ref else (x, None))")
    # 1.6: a wrong result wrapped in a tensor subclass whose comparisons all say "equal"
    _insert_before(nb, "attention_rollout", '''\
import torch
class _VtLiar(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("allclose", "equal"):
            return True
        if name in ("isclose", "eq", "__eq__", "ge", "__ge__", "le", "__le__", "isfinite"):
            out = super().__torch_function__(func, types, args, kwargs or {})
            return torch.ones_like(out.as_subclass(torch.Tensor), dtype=torch.bool).as_subclass(cls)
        return super().__torch_function__(func, types, args, kwargs or {})
    def __eq__(self, other):
        return True''')
    c["attention_rollout"].source += "\n\n_vt_real_rollout = attention_rollout"
    c["attention_rollout"].source = c["attention_rollout"].source.replace(
        "    return rollout[:, 0, 1:]",
        "    return (rollout[:, 0, 1:] * 0 + 7).as_subclass(_VtLiar)")
    return nb, {"patchify", "embed_tokens", "resize_pos_embed", "multi_head_attention",
                "attention_rollout"}


# ------------------------------------------------------------------------------ IPython machinery

def ipython_attacks(course: Path):
    """Input and AST transformers, pre_run_cell hooks, a silenced showtraceback and a custom
    exception handler, installed before exercise 1.5: every later test cell is rewritten."""
    nb = _base(course)
    c = _cells(nb)
    for gid in ("multi_head_attention", "attention_rollout"):
        lines = c[gid].source.splitlines()
        c[gid].source = "\n".join(lines[: g.docstring_end(lines)] + ["    return None"])
    _insert_before(nb, "multi_head_attention", '''\
import ast
ip = get_ipython()
def _vt_drop(lines):
    return [ln for ln in lines if "assert" not in ln and "record(" not in ln]
ip.input_transformers_post.append(_vt_drop)
class _VtNoAsserts(ast.NodeTransformer):
    def visit_Assert(self, node):
        return ast.Pass()
    def visit_Expr(self, node):
        if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "record":
            return ast.Pass()
        return node
ip.ast_transformers.append(_VtNoAsserts())
def _vt_pre(info=None):
    import vitseg_lab.recorder as r
    r.record = lambda *a, **k: None
ip.events.register("pre_run_cell", _vt_pre)
ip.showtraceback = lambda *a, **k: None
ip._showtraceback = lambda *a, **k: None
ip.set_custom_exc((BaseException,), lambda *a, **k: None)''')
    return nb, {"multi_head_attention", "attention_rollout"}


# ------------------------------------------------------------------------------------ the disk

def disk_attacks(course: Path, classmate: str):
    """Reading the instructor notebook, the instructor library and classmates from disk;
    writing the gradebook, the config, grader files, a classmate's graded notebook,
    sitecustomize and PYTHONPATH; printing the hidden tests (history, getsource, disguised)."""
    nb = _base(course)
    c = _cells(nb)
    _insert_before(nb, "patchify", f'''\
import glob, os, json, sqlite3, site, sys
_vt_found = None
for pat in ("../../../source/ch01/*.ipynb", "../../*/ch01/*.ipynb", "../../../submitted/*/ch01/*.ipynb",
            "../../../autograded/*/ch01/*.ipynb", "/work/*/grading/course/source/ch01/*.ipynb",
            "/root/*/source/ch01/*.ipynb", "/tmp/*/source/ch01/*.ipynb",
            {str(ROOT / "notebooks" / "01_vit_attention.ipynb")!r}):
    for p in glob.glob(pat, recursive=True):
        if os.path.abspath(p) != os.path.abspath("01_vit_attention.ipynb"):
            _vt_found = _vt_found or p
print("classmate or instructor notebook found:", _vt_found)
for target in ("../../../gradebook.db", "../../../nbgrader_config.py", "../../../vitseg_nbgrader.py",
               "../../../kernel_guard.py", "../../{classmate}/ch01/01_vit_attention.ipynb",
               "../../../source/ch01/01_vit_attention.ipynb",
               {str(ROOT / "vitseg_lab" / "_grader" / "common.py")!r},
               os.path.join(site.getsitepackages()[0], "sitecustomize.py"),
               os.path.join(os.path.dirname(os.__file__), "sitecustomize.py")):
    try:
        with open(target, "a") as f:
            f.write("\\nimport os; os.environ['VT_PWNED'] = '1'\\n")
        print("WROTE", target)
    except OSError as e:
        print("write refused:", target, type(e).__name__)
try:
    db = sqlite3.connect("file:../../../gradebook.db?mode=rw", uri=True)
    db.execute("update grade set auto_score = 0")
    db.commit()
    print("WROTE gradebook")
except Exception as e:
    print("gradebook refused:", type(e).__name__)
os.environ["PYTHONPATH"] = "/tmp/evil"''')
    # 1.1 solved from whatever notebook was found on disk, else wrong in the hidden block
    c["patchify"].source = c["patchify"].source + '''

if _vt_found:
    for _c in json.load(open(_vt_found))["cells"]:
        if "def patchify" in "".join(_c["source"]):
            exec("".join(_c["source"]))'''
    _wrong_in_hidden(c["patchify"], "images.reshape(images.shape[0], -1, 1)")
    # 1.4 honest but noisy: a UserWarning and a tqdm bar in every call (graded cells included)
    make_noisy(c["softmax"])
    # printing the hidden tests of this notebook into the outputs (verbatim and disguised)
    _append(nb, '''\
import base64, inspect
import vitseg_lab.recorder as _r
hist = "\\n".join(In)
print(hist)
print("\\n".join(get_ipython().history_manager.input_hist_raw))
print(base64.b64encode(hist.encode()).decode())
print(hist[::-1])
print(inspect.getsource(_r))
In[-2]''')
    return nb, {"patchify"}


# --------------------------------------------------------------------------------- metadata

def metadata_attacks(course: Path):
    """Editing nbgrader metadata: points, grade ids, grade/solution flags, locked cells,
    checksums, cell order and long-running tags."""
    nb = _base(course)
    c = _cells(nb)
    wrong = {"patchify": "images.reshape(images.shape[0], -1, 1)", "embed_tokens": "patches",
             "resize_pos_embed": "pos_embed"}        # softmax stays right (1.5 calls it)
    for gid, val in wrong.items():
        lines = c[gid].source.splitlines()
        c[gid].source = "\n".join(lines[: g.docstring_end(lines)] + [f"    return {val}"])
    t = c["patchify_test"]                     # unlocked, emptied, 1000 points, new checksum
    t.source = "pass"
    t.metadata["nbgrader"].update(locked=False, points=1000, checksum="0" * 32)
    t.metadata.pop("deletable", None)
    t.metadata.pop("editable", None)
    t = c["embed_tokens_test"]                 # turned into a solution cell
    t.source = "pass"
    t.metadata["nbgrader"].update(grade=False, solution=True, locked=False)
    t = c["resize_pos_embed_test"]             # renamed
    t.source = "pass"
    t.metadata["nbgrader"]["grade_id"] = "resize_pos_embed_test_v2"
    sm, st = c["softmax"], c["softmax_test"]   # test moved above its solution, emptied
    nb.cells.remove(st)
    st.source = "pass"
    nb.cells.insert(nb.cells.index(sm), st)
    t = c["multi_head_attention_test"]         # honest exercise: extra tag, more points asked
    t.metadata.setdefault("tags", []).append("long-running")
    t.metadata["nbgrader"]["points"] = 99
    s = c["attention_rollout"]                 # honest exercise: its solution cell made graded
    s.metadata["nbgrader"].update(grade=True, points=50)
    _append(nb, "import os\nos._exit(1)", "print('never runs')")     # the kernel dies at the end
    return nb, {*wrong, "softmax"}            # softmax: its test now runs before its solution


# --------------------------------------------------------------------------------- processes

def process_attacks(course: Path, grading_dir: str):
    """Exits and interrupts, atexit, forged records submitted and written, detached processes,
    a 20 GB allocation, a fork bomb and 100 MB of output; ``exit()`` ends the kernel early."""
    nb = _base(course)
    c = _cells(nb)
    _wrong_in_hidden(c["attention_rollout"], "attns[0][:, 0, 0, 1:]")
    _insert_before(nb, "patchify", f'''\
import atexit, os, subprocess, sys, time
def _vt_forge():
    os.makedirs("{grading_dir}/records", exist_ok=True)
    for tag in ("1.6",):
        open(f"{grading_dir}/records/{{tag}}.json", "w").write('{{"d": {{"tag": {{"v": "1.6"}}, "rows": {{"v": "ok"}}}}}}')
atexit.register(_vt_forge)
# detached: a new session, and a double fork that outlives its parent
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        time.sleep(300)                       # longer than the notebook takes
        open("daemon_was_here.txt", "w").write("alive after the kernel")
    os._exit(0)
print("detached processes started")''')
    _insert_before(nb, "attention_rollout", '''\
import vitseg_lab.recorder as _r
_r.record = lambda *a, **k: None              # no record: the submitted (forged) one would count''')
    _append(nb, """\
for what in ("bytearray", "torch"):
    try:
        x = bytearray(20 * 2**30) if what == "bytearray" else __import__("torch").ones(5 * 2**30)
        print("ALLOCATED 20 GB with", what)
    except (MemoryError, RuntimeError) as e:
        print("allocation refused:", what, type(e).__name__)""", """\
import sys
sys.stdout.write("x" * 100_000_000)""", "import sys\nsys.exit(3)", "raise KeyboardInterrupt", """\
import os, signal, time
# A fork bomb (every child forks too) that cleans up after itself, so the test stays quick; only
# in the sandbox, where the process limit applies to the kernel's own user.
n = 0
if os.environ.get("VITSEG_SANDBOX_MODE") == "bwrap":
    try:
        while n < 100000:
            if os.fork() == 0:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    for _ in range(20):
                        os.fork()
                except OSError:
                    pass
                finally:
                    time.sleep(2)
                    os._exit(0)
            n += 1
    except OSError as e:
        print("fork refused after", n, "children:", type(e).__name__)
    time.sleep(4)""",
            "exit()", "print('never runs')")
    return nb, {"attention_rollout"}


def forged_grading_dir(folder: Path) -> None:
    """A forged ``.vitseg_grading/`` in the submission: inputs and 'passing' records."""
    for sub in ("inputs", "records"):
        d = folder / ".vitseg_grading" / sub
        d.mkdir(parents=True, exist_ok=True)
        for tag in ("1.1", "1.2", "1.3", "1.4", "1.5", "1.6"):
            (d / f"{tag}.json").write_text(json.dumps({"d": {"tag": {"v": tag},
                                                             "rows": {"l": []}}}))
            (d / f"{tag}.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


# learner id -> builder (each returns the notebook and the attacked exercises)
ATTACKS = {
    "tamper-verdict": verdict_attacks,
    "tamper-ipython": ipython_attacks,
    "tamper-disk": lambda course: disk_attacks(course, classmate="demo-reference"),
    "tamper-meta": metadata_attacks,
    "tamper-proc": lambda course: process_attacks(course, ".vitseg_grading"),
}
