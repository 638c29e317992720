"""Instructor-only hidden checks for the autograder. Never shipped in the student edition, and
absent from every grading kernel's folder.

Each ``chNN.py`` holds a chapter's naive formulations, hidden-case builders, ``CHECKS``, ``BUGS``
and ``DEMO`` (``common.py`` says how). During autograde the kernel only records the learner's
outputs (``vitseg_lab.recorder``); ``autograde.py`` computes the verdicts in nbgrader's own process
after the kernel is gone.
"""
