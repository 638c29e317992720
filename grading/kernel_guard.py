# Run by every grading kernel at start-up (ipykernel --IPKernelApp.exec_files, set in
# nbgrader_config.py).
#
# 1. Warnings, plain tqdm bars and logging go to stdout while nbgrader runs the notebook: nbgrader
#    gives a test cell 0 for *any* stderr output, and its ignore patterns apply to autograde only,
#    not to the Validate button. The student edition's nbgrader_config.py does the same for
#    Validate (``STDERR_TO_STDOUT`` there), so both give a correct solution the same score.
# 2. During autograde, the library must be the copy in the assignment folder (the student
#    edition's stubs, copied from source/ by nbgrader), never an installed instructor edition:
#    otherwise an unfinished exercise could fall back on our reference. In the sandbox (grading/
#    vitseg_sandbox.py) nothing else is even mounted; without it, if the import resolves anywhere
#    else the kernel exits, so nbgrader fails the submission loudly ("There was an error
#    processing assignment") instead of grading it against the wrong code.
def _vitseg_grading_guard():
    import os
    import sys

    if os.environ.get("NBGRADER_EXECUTION") in ("autograde", "validate"):
        sys.stderr = sys.stdout
    if os.environ.get("NBGRADER_EXECUTION") != "autograde":
        return
    here = os.path.realpath(os.getcwd())
    # The kernel puts the working folder ('') after PYTHONPATH entries, so a PYTHONPATH naming the
    # instructor's repository would shadow the assignment's copy: put the folder first.
    sys.path[:] = [here] + [p for p in sys.path if os.path.realpath(p or ".") != here]
    import vitseg_lab

    lib = os.path.realpath(os.path.dirname(vitseg_lab.__file__))
    if lib != os.path.join(here, "vitseg_lab"):
        sys.__stderr__.write(
            f"vitseg-lab grading guard: vitseg_lab was imported from {lib}, not from the "
            f"assignment folder {here}; refusing to grade against it.\n")
        sys.__stderr__.flush()
        os._exit(86)


_vitseg_grading_guard()
del _vitseg_grading_guard
