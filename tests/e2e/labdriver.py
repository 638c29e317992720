"""A JupyterLab server and a notebook page, driven the way a learner drives them.

``LabServer`` starts ``jupyter-lab`` from this interpreter's environment on a free loopback port,
in a throw-away folder (settings, workspaces, runtime and config directories all inside it, so
the learner's own ``~/.jupyter`` never leaks in), and stops it — and any kernel it left — by
process id. ``Notebook`` wraps a Playwright page holding one open notebook: run all cells, read
prompts and outputs, drive ipywidgets controls, add a cell, press nbgrader's Validate button.

Every wait has a timeout; nothing sleeps for a fixed time except short polling intervals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path(os.environ.get("VITSEG_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-extensions", "--no-first-run", "--mute-audio"]
VIEWPORT = {"width": 1400, "height": 1000}

# Lab settings for a deterministic page: no news/update toast over the page, every cell
# rendered (no virtual scrolling, so off-screen outputs exist in the DOM), no autosave.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
        {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings":
        {"autosave": False},
}

ERROR_MIME = "application/vnd.jupyter.error"
STDERR_MIME = "application/vnd.jupyter.stderr"
STDOUT_MIME = "application/vnd.jupyter.stdout"
# How a failure message names an output, by the data-mime-type JupyterLab gives its node.
OUTPUT_KINDS = {ERROR_MIME: "error output", STDERR_MIME: "stderr (red box)",
                STDOUT_MIME: "stdout"}


class LabError(AssertionError):
    """Something the learner would see go wrong (a test failure, with the server log tail)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ===================================================================================== server

@dataclass
class LabServer:
    """``jupyter-lab`` serving ``root`` (its working folder too: nbgrader's Validate handler
    reads ``nbgrader_config.py`` from there, as it does when a learner runs ``make lab``)."""

    root: Path
    home: Path                       # throw-away: settings/, workspaces/, runtime/, config/, lab.log
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "lab.log"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self, timeout: float = 90) -> LabServer:
        self.home.mkdir(parents=True, exist_ok=True)
        for rel, value in LAB_SETTINGS.items():
            p = self.home / "settings" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(value))
        for d in ("workspaces", "runtime", "config", "data"):
            (self.home / d).mkdir(exist_ok=True)
        bindir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("JUPYTER", "NBGRADER_", "PYTEST_", "VITSEG_"))
               and k not in ("PYTHONPATH", "MPLBACKEND")}
        env.update(
            PATH=os.pathsep.join([bindir, env.get("PATH", "")]),
            JUPYTERLAB_SETTINGS_DIR=str(self.home / "settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"),
            JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
            JUPYTER_CONFIG_DIR=str(self.home / "config"),   # not the user's ~/.jupyter
            VITSEG_SCALE="quick",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        self.port = free_port()
        cmd = [os.path.join(bindir, "jupyter-lab"), "--no-browser", "--ip", "127.0.0.1",
               "--port", str(self.port), "--ServerApp.port_retries=0",
               "--IdentityProvider.token=", "--ServerApp.password=",
               "--allow-root", f"--ServerApp.root_dir={self.root}"]
        with open(self.log_path, "wb") as log:     # the server keeps its own copy of the fd
            # A simple command, not a shell: self.proc.pid is the server itself.
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"jupyter-lab exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise LabError(f"jupyter-lab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the server (it shuts its kernels down), then SIGKILL whatever of it and of its
        kernels is still alive — each by its own pid."""
        if self.proc is None:
            return
        try:
            import psutil

            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
        except ImportError:                  # psutil comes with ipykernel; be safe anyway
            psutil, children = None, []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if psutil is not None:
            _gone, alive = psutil.wait_procs(children, timeout=5)
            for child in alive:
                try:
                    child.kill()
                except psutil.Error:
                    pass
        self.proc = None


# =================================================================================== notebook

class Notebook:
    """One notebook open in JupyterLab, in a Playwright page."""

    _opened = 0

    def __init__(self, page, server: LabServer, path: str, shots: Path):
        self.page = page
        self.server = server
        self.path = path
        self.shots = shots
        self.name = Path(path).stem
        self.console: list[str] = []
        self.cell_seconds: dict[int, float] = {}
        self._t_open = time.monotonic()
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    # ---------------------------------------------------------------------------- basics

    @property
    def panel(self):
        return self.page.locator(".jp-NotebookPanel").filter(visible=True).first

    @property
    def cells(self):
        return self.panel.locator(".jp-Notebook .jp-Cell")

    @property
    def code_cells(self):
        return self.panel.locator(".jp-Notebook .jp-CodeCell")

    def shot(self, label: str, locator=None) -> bytes:
        path = self.shots / f"{self.name}--{label}.png"
        png = (locator or self.page).screenshot(path=str(path), timeout=30_000)
        return png

    def fail(self, msg: str) -> LabError:
        try:
            self.shot("FAILURE")
        except Exception as e:  # noqa: BLE001 - a failure screenshot is best effort
            self.console.append(f"(no failure screenshot: {e})")
        console = "\n".join(self.console[-30:])
        return LabError(f"{self.name}: {msg}\n--- browser console (errors, warnings) ---\n"
                        f"{console}\n"
                        f"--- jupyter-lab log (tail) ---\n{self.server.log_tail(3000)}")

    def open(self, timeout: float = 120) -> Notebook:
        """Open the notebook in a workspace of its own (reset: no tab restored from an earlier
        page of this server) and wait until its kernel is idle."""
        Notebook._opened += 1
        self._t_open = time.monotonic()
        ws = f"e2e-{os.getpid()}-{Notebook._opened}"
        self.page.goto(f"{self.server.url}/lab/workspaces/{ws}/tree/{self.path}?reset",
                       timeout=timeout * 1000)
        tab = self.page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current",
                                has_text=Path(self.path).name)
        try:
            tab.first.wait_for(timeout=timeout * 1000)
        except Exception as e:
            raise self.fail(f"{self.path} did not open as the current tab") from e
        self.wait_kernel_idle(timeout)
        n = self.page.locator(".jp-NotebookPanel").count()
        if n != 1:
            raise self.fail(f"{n} notebook panels open; expected only {self.path}")
        # Every cell rendered before anything is run (Lab renders a long notebook in steps; a
        # Run All issued earlier runs only what is there).
        cells = json.loads((self.server.root / self.path).read_text())["cells"]
        self.n_code = sum(1 for c in cells if c["cell_type"] == "code")
        deadline = time.monotonic() + timeout
        while self.code_cells.count() != self.n_code:
            if time.monotonic() > deadline:
                raise self.fail(f"{self.code_cells.count()} of {self.n_code} code cells "
                                f"rendered after {timeout:.0f} s")
            time.sleep(0.3)
        return self

    def kernel_status(self) -> str | None:
        ind = self.page.locator(".jp-Notebook-ExecutionIndicator").first
        if ind.count() == 0:
            return None
        return ind.get_attribute("data-status")

    def wait_kernel_idle(self, timeout: float) -> None:
        try:
            self.page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first \
                .wait_for(timeout=timeout * 1000)
        except Exception as e:
            raise self.fail(f"kernel not idle within {timeout:.0f} s "
                            f"(status {self.kernel_status()!r})") from e

    def prompts(self) -> list[str]:
        return [t.strip() for t in self.code_cells.locator(".jp-InputPrompt").all_inner_texts()]

    # ---------------------------------------------------------------------------- running

    def command(self, label: str, menu: str = "Run") -> None:
        """Click a main-menu item (``Run > Run All Cells``), as a learner does."""
        self.page.locator(".lm-MenuBar-item", has_text=re.compile(f"^{menu}$")).first.click()
        item = self.page.locator(".lm-Menu-item:not(.lm-mod-disabled)",
                                 has=self.page.locator(".lm-Menu-itemLabel",
                                                       has_text=re.compile(f"^{label}$")))
        item.first.click(timeout=10_000)

    def run_all(self, timeout: float) -> float:
        """Run > Run All Cells, then wait until every code cell has an execution count and the
        kernel is idle. Returns the seconds it took."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        n = self.code_cells.count()
        t0 = time.monotonic()
        started = ("() => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell "
                   ".jp-InputPrompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))")
        self.command("Run All Cells")
        try:                              # the click took: some cell queued, running or done
            self.page.wait_for_function(started, timeout=30_000)
        except PlaywrightTimeout:
            # Nothing queued (no "[*]"), so a second click cannot run anything twice. On a loaded
            # machine the first click can land before the notebook's kernel session is wired up.
            self.command("Run All Cells")
        try:
            self.page.wait_for_function(started, timeout=90_000)
        except Exception as e:
            prompts = self.prompts()
            shown = ", ".join(f"{p!r} x{prompts.count(p)}" for p in dict.fromkeys(prompts))
            raise self.fail(f"Run > Run All Cells (clicked twice) started nothing in 120 s: kernel "
                            f"{self.kernel_status()!r}, {len(prompts)} code-cell prompts "
                            f"({shown}); Run All clicked {t0 - self._t_open:.0f} s after opening the "
                            "notebook began") from e
        deadline = t0 + timeout
        numbered = re.compile(r"^\[\d+\]:$")
        last = ""
        stalled_since = None
        self.cell_seconds = {}
        while time.monotonic() < deadline:
            prompts = self.prompts()
            status = self.kernel_status()
            done = sum(1 for p in prompts if numbered.match(p))
            queued = sum(1 for p in prompts if "*" in p)
            for i, p in enumerate(prompts):      # when each cell finished (a coarse timing)
                if numbered.match(p) and i not in self.cell_seconds:
                    self.cell_seconds[i] = round(time.monotonic() - t0, 1)
            last = f"{done}/{n} cells numbered, {queued} queued, kernel {status!r}"
            if done == n and status == "idle":
                # the last prompt can be numbered before its outputs arrive: settle once more
                time.sleep(0.5)
                if self.kernel_status() == "idle":
                    return time.monotonic() - t0
            if self.error_outputs():
                break                     # an error stops Run All: report it at once
            # Run All given up without an error output (cells back to [ ], kernel idle): the
            # execution was aborted or the kernel connection dropped. Say so within seconds.
            if queued == 0 and status == "idle" and done < n:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 15:
                    first = next(i for i, p in enumerate(prompts) if not numbered.match(p))
                    raise self.fail(f"Run All stopped at code cell {first} without an error "
                                    f"output ({last}).\n{self.stop_report(first)}")
            else:
                stalled_since = None
            time.sleep(1.0)
        errors = self.error_outputs()
        if errors:
            raise self.fail(f"Run All stopped on an error:\n{self.stop_report()}")
        raise self.fail(f"Run All not finished after {timeout:.0f} s ({last})\n"
                        f"{self.stop_report()}")

    def _cell(self, cell):
        return self.code_cells.nth(cell) if isinstance(cell, int) else cell

    def outputs_of(self, cell) -> list[tuple[str, str]]:
        """(kind, text) of every output a code cell (index or locator) shows: 'error output',
        'stderr (red box)', 'stdout' or the MIME type of a rich output (image/png, widget…)."""
        outs = self._cell(cell).locator(".jp-OutputArea-output")
        shown = []
        for k in range(outs.count()):
            o = outs.nth(k)
            mime = o.get_attribute("data-mime-type") or "(no mime type)"
            text = o.inner_text() if mime.startswith(("text/", "application/vnd.jupyter")) \
                else ""
            shown.append((OUTPUT_KINDS.get(mime, mime), text))
        return shown

    def describe_cell(self, cell, chars: int = 1500) -> str:
        """A code cell (index or locator) as the page shows it: prompt, source head, and each
        output's kind and text (what a failure message must say, e.g. an error that JupyterLab
        shows as stderr rather than as an error output)."""
        c = self._cell(cell)
        prompt = c.locator(".jp-InputPrompt").inner_text().strip()
        src = c.locator(".jp-InputArea-editor").inner_text()
        outs = self.outputs_of(c)
        shown = "\n".join(f"    [{kind}] {text[:chars]!r}" if text else f"    [{kind}]"
                          for kind, text in outs) or "    (no output)"
        where = f"code cell {cell}" if isinstance(cell, int) else "code cell"
        return f"{where} {prompt} {src[:200]!r}, {len(outs)} output(s):\n{shown}"

    def problem_cells(self, limit: int = 5) -> list[int]:
        """Indices of the code cells showing an error output or stderr (first ``limit``)."""
        bad = {OUTPUT_KINDS[ERROR_MIME], OUTPUT_KINDS[STDERR_MIME]}
        found = []
        for i in range(self.code_cells.count()):
            if {k for k, _ in self.outputs_of(i)} & bad:
                found.append(i)
                if len(found) >= limit:
                    break
        return found

    def problem_report(self) -> str:
        """Every cell with an error output or stderr, described (or a line saying none)."""
        cells = self.problem_cells()
        return ("\n".join(self.describe_cell(i) for i in cells) if cells
                else "(no cell shows an error output or stderr)")

    def stop_report(self, first: int | None = None) -> str:
        """What the page shows where Run All stopped: the last cell that ran (highest execution
        count), the first cell that did not (``first``), and every cell with an error output or
        stderr, each with its outputs' kinds and text."""
        counts = {i: int(m.group(1)) for i, p in enumerate(self.prompts())
                  if (m := re.match(r"^\[(\d+)\]:$", p))}
        picked = [max(counts, key=counts.get)] if counts else []
        picked += ([first] if first is not None else []) + self.problem_cells()
        return "\n".join(self.describe_cell(i) for i in dict.fromkeys(picked))

    def error_outputs(self) -> list[str]:
        return self.panel.locator(
            f".jp-OutputArea-output[data-mime-type='{ERROR_MIME}']").all_inner_texts()

    def stderr_outputs(self) -> list[str]:
        return self.panel.locator(
            f".jp-OutputArea-output[data-mime-type='{STDERR_MIME}']").all_inner_texts()

    def cell_with(self, text: str):
        """The code cell whose source contains ``text`` (exactly one)."""
        cell = self.code_cells.filter(has=self.page.locator(".jp-InputArea-editor",
                                                            has_text=text))
        if cell.count() != 1:
            raise self.fail(f"expected one code cell containing {text!r}, found {cell.count()}")
        return cell.first

    def append_cell(self, source: str):
        """Add a code cell at the end (command mode, 'b' below the last cell), type ``source``
        and run it in place; returns the cell."""
        n = self.code_cells.count()
        last = self.cells.last
        last.scroll_into_view_if_needed()
        last.locator(".jp-Cell-inputWrapper, .jp-InputArea").first.click()
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("b")
        try:
            self.page.wait_for_function(
                "n => [...document.querySelectorAll('.jp-NotebookPanel')]"
                ".filter(p => p.checkVisibility())"
                ".some(p => p.querySelectorAll('.jp-Notebook .jp-CodeCell').length > n)",
                arg=n, timeout=10_000)
        except Exception as e:
            raise self.fail("pressing 'b' in command mode added no cell") from e
        cell = self.code_cells.nth(n)
        cell.locator(".cm-content").click()
        # insert_text: no auto-indentation or bracket closing from the editor
        self.page.keyboard.insert_text(source)
        return cell

    def run_cell(self, cell, timeout: float = 60) -> str:
        """Run ``cell`` in place (Ctrl+Enter) and return its output text once its prompt shows a
        new execution count and the kernel is idle."""
        before = cell.locator(".jp-InputPrompt").inner_text().strip()
        cell.locator(".cm-content").click()
        self.page.keyboard.press("Control+Enter")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = cell.locator(".jp-InputPrompt").inner_text().strip()
            if re.match(r"^\[\d+\]:$", p) and p != before and self.kernel_status() == "idle":
                return cell.locator(".jp-OutputArea").inner_text()
            time.sleep(0.3)
        raise self.fail(f"cell did not finish within {timeout:.0f} s: "
                        f"{cell.locator('.jp-InputArea-editor').inner_text()[:200]!r}")

    # ---------------------------------------------------------------------------- widgets

    def widget_area(self, cell):
        """The rendered widget view of ``cell`` (its output area)."""
        area = cell.locator(".jp-OutputArea").first
        try:
            area.locator(".widget-vbox").first.wait_for(timeout=60_000)
        except Exception as e:
            raise self.fail("the explorer widget did not render (no .widget-vbox in the cell's "
                            "output; is ipywidgets' lab extension loaded?)") from e
        return area

    def figure(self, area, timeout: float = 60):
        """The figure image inside the explorer's Output widget, once drawn."""
        img = area.locator(".widget-output img").first
        try:
            img.wait_for(timeout=timeout * 1000)
        except Exception as e:
            raise self.fail("the explorer's figure did not appear in its Output widget") from e
        return img

    def control(self, area, kind: str, label: str):
        """An ipywidgets control by type and description label: kind is one of
        'slider', 'dropdown', 'toggle'."""
        cls = {"slider": ".widget-hslider", "dropdown": ".widget-dropdown",
               "toggle": ".widget-toggle-buttons"}[kind]
        box = area.locator(cls).filter(
            has=self.page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$")))
        if box.count() != 1:
            raise self.fail(f"expected one {kind} labelled {label!r}, found {box.count()}")
        return box.first

    def slider_value(self, slider) -> str:
        return slider.locator(".widget-readout").inner_text().strip()

    def press_slider(self, slider, key: str, times: int = 1) -> None:
        handle = slider.locator(".noUi-handle").first
        handle.scroll_into_view_if_needed()
        handle.focus()
        for _ in range(times):
            self.page.keyboard.press(key)

    def figure_src(self, area) -> str:
        """The data URL of the figure the explorer's Output widget shows ('' while redrawing)."""
        img = area.locator(".widget-output img")
        return (img.first.get_attribute("src") or "") if img.count() else ""

    def snapshot(self, area, label: str) -> tuple[str, bytes]:
        """(figure data URL, screenshot of the figure); the whole explorer (controls included)
        is saved as ``<notebook>--<label>.png`` for a human to look at."""
        area.scroll_into_view_if_needed()
        self.shot(label, area.locator(".widget-vbox").first)
        fig = area.locator(".widget-output").first
        return self.figure_src(area), fig.screenshot(timeout=30_000)

    def wait_redraw(self, area, before: tuple[str, bytes], label: str,
                    timeout: float = 60) -> tuple[str, bytes]:
        """After a control changed: wait until the kernel has drawn a new figure (a different
        image, the same in two polls in a row, kernel idle); return ``snapshot``."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            time.sleep(0.4)
            src = self.figure_src(area)
            if src and src != before[0] and src == seen and self.kernel_status() == "idle":
                time.sleep(0.3)       # let the browser decode and paint the new image
                return self.snapshot(area, label)
            seen = src
        raise self.fail(f"the explorer's figure did not change within {timeout:.0f} s "
                        f"({label})")

    # ---------------------------------------------------------------------------- nbgrader

    def validate(self, timeout: float) -> tuple[bool, str]:
        """Press nbgrader's Validate toolbar button; return (success, dialog text) and close the
        dialog. The button saves the notebook first (into the throw-away copy)."""
        button = self.panel.locator(".jp-Toolbar").get_by_role("button", name="Validate")
        try:
            button.first.wait_for(timeout=30_000)
        except Exception as e:
            raise self.fail("no Validate button in the notebook toolbar (nbgrader's lab "
                            "extension not loaded?)") from e
        button.first.click()
        dialog = self.page.locator(".jp-Dialog").filter(has_text="Validation")
        try:
            dialog.first.wait_for(timeout=timeout * 1000)
        except Exception as e:
            raise self.fail(f"no validation dialog within {timeout:.0f} s") from e
        msg = dialog.first.locator("#validation-message")
        text = dialog.first.inner_text()
        ok = msg.count() == 1 and "validation-success" in (msg.get_attribute("class") or "")
        if not ok and msg.locator(".jp-RenderedText").count() > 1:
            # show the first failure's error message, not only its cell's source
            msg.locator(".jp-RenderedText").nth(1).scroll_into_view_if_needed()
        self.shot("validate")
        dialog.first.get_by_role("button", name=re.compile("^(Ok|OK)$")).first.click()
        dialog.first.wait_for(state="detached", timeout=10_000)
        return ok, text
