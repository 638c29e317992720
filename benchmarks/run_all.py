"""``make bench``: run every script in benchmarks/, collect their JSON in benchmarks/results/, and
print one table of the ratios each measured in its own run (plus ``summary.json`` and
``summary.png``).

A ratio is any number whose key says so (``ratio*``, ``*_vs_*``, ``*speedup*``): vectorised vs
loop references (goal >= 20x), fast path vs eager, FLOP/s vs the bare timm backbone, loader vs
step. Absolute times appear only beside the device they were measured on. With the course
timings on (the default; ``--no-course`` skips them) it also runs each notebook at quick scale
(``tools.celltimes``; goal <= 60 s on 2 cores) and the autograding benchmark
(``tools.grading bench``, seconds per learner).

    python benchmarks/run_all.py                    # everything (tens of minutes on 2 cores)
    python benchmarks/run_all.py --only bench_atm,bench_train_step --no-course
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
RATIO_KEY = re.compile(r"(^ratio|_ratio|ratio_|_vs_|speedup)", re.IGNORECASE)
LABEL_KEYS = ("chapter", "config", "model", "name", "case", "exercise", "op")
#: Goals stated in issue 13 (and the chapters' benchmarks), by ratio-key pattern.
GOALS = ((re.compile(r"^ratio_(per_|loop|naive|literal)|_vs_loop|loop_ratio"), ">= 20"),
         (re.compile(r"flops_per_s_vs_timm"), ">= 0.9 on H100/H200"),
         (re.compile(r"loader_vs_step"), ">= 1"))
NOTEBOOK_BUDGET_S = 60.0


def scripts(only: list[str] | None, bench: Path = BENCH) -> list[Path]:
    found = [p for p in sorted(bench.glob("*.py")) if p.name != "run_all.py"
             and not p.name.startswith("_")]
    if only:
        missing = set(only) - {p.stem for p in found}
        if missing:
            raise SystemExit(f"no benchmark called {', '.join(sorted(missing))}; available: "
                             f"{', '.join(p.stem for p in found)}.")
        found = [p for p in found if p.stem in only]
    return found


def run_script(path: Path, timeout: float, results: Path = RESULTS) -> dict[str, Any]:
    """Run one script (with ``--json results/<stem>.json`` when it takes ``--json``)."""
    out = results / f"{path.stem}.json"
    cmd = [sys.executable, str(path)]
    if '"--json"' in path.read_text():
        cmd += ["--json", str(out)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        status, tail = ("ok" if p.returncode == 0 else f"failed (exit {p.returncode})",
                        (p.stdout + p.stderr)[-1500:])
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {timeout:.0f} s", ""
    seconds = time.perf_counter() - t
    fresh = out.exists() and out.stat().st_mtime >= time.time() - seconds - 1
    return {"script": path.stem, "status": status, "seconds": seconds, "tail": tail,
            "json": str(out) if fresh else None}


def ratios(data: Any, label: str = "") -> list[tuple[str, str, float]]:
    """Every (case label, key, value) whose key names a ratio, anywhere in a JSON document."""
    found = []
    if isinstance(data, dict):
        here = label
        for k in LABEL_KEYS:
            if isinstance(data.get(k), (str, int)) and not isinstance(data.get(k), bool):
                here = f"{label}/{data[k]}" if label else str(data[k])
                break
        for k, v in data.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and RATIO_KEY.search(k):
                if math.isfinite(v):
                    found.append((here, k, float(v)))
            elif isinstance(v, (dict, list)):
                found += ratios(v, here)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += ratios(v, label if isinstance(v, dict) else f"{label}[{i}]")
    return found


def goal(key: str) -> str:
    return next((g for pat, g in GOALS if pat.search(key)), "")


def notebook_times(timeout: float) -> list[dict[str, Any]]:
    rows = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "tools.celltimes", str(nb)], cwd=ROOT,
                               capture_output=True, text=True, timeout=timeout, check=False,
                               env={**os.environ, "VITSEG_SCALE": "quick"})
            m = re.search(r"^total ([\d.]+)s", p.stdout, re.MULTILINE)
            errors = p.stdout.count(" ERROR ")
            status = "ok" if m and not errors and p.returncode == 0 else (
                f"{errors} cell error(s)" if errors else f"failed (exit {p.returncode})")
            seconds = float(m.group(1)) if m else time.perf_counter() - t
        except subprocess.TimeoutExpired:
            status, seconds = f"timed out after {timeout:.0f} s", float(timeout)
        rows.append({"notebook": nb.name, "seconds": seconds, "status": status,
                     "budget_s": NOTEBOOK_BUDGET_S, "within_budget": seconds <= NOTEBOOK_BUDGET_S})
    return rows


def grading_time(timeout: float) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "tools.grading", "bench"], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout, check=False)
        out = p.stdout + p.stderr
        m = re.search(r"([\d.]+)\s*s(?:econds)?\s*(?:/|per)\s*learner", out)
        return {"status": "ok" if p.returncode == 0 else f"failed (exit {p.returncode})",
                "seconds_per_learner": float(m.group(1)) if m else None,
                "seconds": time.perf_counter() - t, "tail": out[-1500:]}
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "seconds_per_learner": None}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not rows:
        return
    fig = Figure(figsize=(9, 0.28 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    names = [f"{r['benchmark']}: {r['case']} {r['ratio']}".strip() for r in rows]
    vals = [r["value"] for r in rows]
    ax.barh(range(len(rows)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (same-run baseline = 1)")
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated script names (default: all)")
    ap.add_argument("--no-course", action="store_true",
                    help="skip the notebook run times and the autograding time")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per script")
    ap.add_argument("--bench-dir", default=str(BENCH), help=argparse.SUPPRESS)  # tests
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    a = ap.parse_args(argv)
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    only = [s.strip() for s in a.only.split(",") if s.strip()] or None
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            machine += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    runs, table = [], []
    for path in scripts(only, Path(a.bench_dir)):
        print(f"running {path.name} ...", flush=True)
        r = run_script(path, a.timeout, results)
        runs.append(r)
        print(f"  {r['status']} in {r['seconds']:.0f} s" + ("" if r["status"] == "ok"
                                                             else "\n" + r["tail"]))
        if r["json"]:
            doc = json.loads(Path(r["json"]).read_text())
            for case, key, value in ratios(doc):
                table.append({"benchmark": path.stem, "case": case, "ratio": key,
                              "value": value, "goal": goal(key)})
    course: dict[str, Any] = {}
    if not a.no_course:
        print("timing each notebook at quick scale ...", flush=True)
        course["notebooks"] = notebook_times(a.timeout)
        print("timing autograding ...", flush=True)
        course["grading"] = grading_time(a.timeout)

    print(f"\nratios measured in one run each ({machine}):")
    w = max([len(f"{r['benchmark']} {r['case']}") for r in table] + [10])
    for r in table:
        print(f"  {(r['benchmark'] + ' ' + r['case']):<{w}}  {r['ratio']:<28} "
              f"{r['value']:10.3g}  {r['goal']}")
    for r in course.get("notebooks", []):
        print(f"  notebook {r['notebook']:<40} {r['seconds']:6.1f} s (goal <= 60 s on 2 cores) "
              f"{r['status']}")
    if course.get("grading"):
        g = course["grading"]
        print(f"  autograding: {g.get('seconds_per_learner')} s per learner ({g['status']})")
    failed = [r["script"] for r in runs if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}")
    summary = {"machine": machine, "runs": [{k: v for k, v in r.items() if k != "tail"}
                                            for r in runs],
               "ratios": table, "course": course, "failed": failed}
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(table, results / "summary.png")
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
