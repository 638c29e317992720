"""Execute a notebook and print each code cell's wall time (for keeping chapters under a minute).

    python -m tools.celltimes notebooks/01_vit_attention.ipynb
"""

from __future__ import annotations

import sys
import time

import nbformat
from nbclient import NotebookClient


def main(path: str) -> int:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True)
    t_all = time.time()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t = time.time()
            client.execute_cell(cell, i)
            err = [o for o in cell.outputs if o.output_type == "error"]
            first = cell.source.splitlines()[0][:60] if cell.source else ""
            print(f"cell {i:3d} {time.time() - t:6.1f}s {'ERROR ' + err[0].ename if err else ''} {first}")
    print(f"total {time.time() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
