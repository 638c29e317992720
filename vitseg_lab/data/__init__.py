"""Data: ShapeScenes (procedural, every label the course needs) and loaders for the real benchmarks.

Import loaders by module (``from vitseg_lab.data.shapes import ShapeScenes``) so that importing the
package stays cheap.
"""
