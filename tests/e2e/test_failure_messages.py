"""The browser test's failure messages say what the page shows (issue 18: JupyterLab showed a
RuntimeError as stderr, and the test only said "stopped without an error output").

A static page with JupyterLab's notebook markup (no server, no kernel; a few seconds): the
reports of ``labdriver.Notebook`` must name each output's kind — error output, stderr, stdout,
an image — and quote its text.
"""

from __future__ import annotations

import pytest
from labdriver import ERROR_MIME, STDERR_MIME, STDOUT_MIME, Notebook

pytestmark = [pytest.mark.e2e]


class _NoServer:
    def log_tail(self, n: int = 4000) -> str:
        return "(no server)"


def _cell(prompt: str, source: str, outputs: list[tuple[str, str]]) -> str:
    outs = "".join(f'<div class="jp-OutputArea-output" data-mime-type="{m}">{t}</div>'
                   for m, t in outputs)
    return (f'<div class="jp-Cell jp-CodeCell"><div class="jp-InputPrompt">{prompt}</div>'
            f'<div class="jp-InputArea-editor">{source}</div>'
            f'<div class="jp-OutputArea">{outs}</div></div>')


SHAPE_ERROR = "RuntimeError: shape '[1, 4, 16, 16]' is invalid for input of size 102400"
PAGE = ('<div class="jp-NotebookPanel"><div class="jp-Notebook">'
        + _cell("[1]:", "import torch", [(STDOUT_MIME, "set-up done")])
        + _cell("[2]:", "toy = segvit.toy()", [
            (STDOUT_MIME, "building the toy"),
            (STDERR_MIME, SHAPE_ERROR)])
        + _cell("[ ]:", "show(toy)", [])
        + _cell("[ ]:", "fit()", [("image/png", '<img src="data:image/png;base64,AA==">')])
        + "</div></div>")


@pytest.fixture
def notebook(page, tmp_path):
    page.set_content(PAGE)
    return Notebook(page, _NoServer(), "notebooks/03_segvit_atm.ipynb", tmp_path)


def test_a_stop_without_an_error_output_quotes_the_stderr_that_stopped_it(notebook):
    assert notebook.error_outputs() == []                  # what used to be the whole story
    report = notebook.stop_report(first=2)
    assert "code cell 1 [2]:" in report and "code cell 2 [ ]:" in report
    assert "[stderr (red box)] \"RuntimeError: shape '[1, 4, 16, 16]' is invalid" in report
    assert "[stdout] 'building the toy'" in report
    assert "(no output)" in report                         # the cell that never ran
    err = notebook.fail(f"Run All stopped at code cell 2 without an error output.\n{report}")
    assert "RuntimeError: shape" in str(err) and "stderr" in str(err)


def test_each_output_is_named_by_its_kind(notebook, page):
    assert notebook.outputs_of(1) == [
        ("stdout", "building the toy"),
        ("stderr (red box)", SHAPE_ERROR)]
    assert notebook.outputs_of(3) == [("image/png", "")]
    assert notebook.problem_cells() == [1]
    page.set_content(PAGE.replace(STDERR_MIME, ERROR_MIME))
    assert notebook.outputs_of(1)[1][0] == "error output"
    assert "[error output] \"RuntimeError" in notebook.problem_report()
    page.set_content(PAGE.replace(STDERR_MIME, STDOUT_MIME))
    assert notebook.problem_report() == "(no cell shows an error output or stderr)"
