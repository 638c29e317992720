"""Instructor-only hidden checks for the autograder. Never shipped in the student edition.

Each ``chNN.py`` holds ``check_<exercise>(fn)`` functions: they run the learner's function on grader
inputs (other shapes, dtypes, edge cases) and compare with an independent naive formulation. The
comparison runs in a fresh Python process (``common.compare_in_subprocess``) so that a learner who
monkeypatches torch, numpy or builtins in the kernel cannot change the verdict.
"""
