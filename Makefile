# Thin wrappers, no logic: the two commands a learner needs are `make lab` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
NBVAL  := --nbval-lax --nbval-current-env --nbval-cell-timeout=300 -p no:cacheprovider

.PHONY: lab test unit notebooks venv student grade-demo e2e bench notebooks-build clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# `make lab` is the learner's: the STUDENT edition (exercises to write), built once into
# dist/student/ (`make student` rebuilds it and overwrites the work in it) and opened there with
# its stub library first on the path. `make lab-instructor`: this repository's notebooks/, solved.
STUDENT_DIR := dist/student
ROOT_FLAG   := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: venv                       ## learners: the student edition (dist/student/notebooks/) in JupyterLab
	@test -d $(STUDENT_DIR)/notebooks || $(PY) -m tools.student --out $(STUDENT_DIR)
	@$(if $(ROOT_FLAG),echo "make lab: running as root (a container?) so JupyterLab gets --allow-root.")
	cd $(STUDENT_DIR) && PYTHONPATH="$(CURDIR)/$(STUDENT_DIR)" "$(CURDIR)/$(VENV)/bin/jupyter" lab $(ROOT_FLAG) notebooks/

.PHONY: lab-instructor
lab-instructor: venv            ## instructors: this repository's notebooks/ (solutions filled in)
	@$(if $(ROOT_FLAG),echo "make lab-instructor: running as root so JupyterLab gets --allow-root.")
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/

test: venv                      ## everything CI runs
	$(PY) -m ruff check .
	$(PY) -m tools.nbbuild --check
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m pytest $(NBVAL) notebooks/*.ipynb

unit: venv
	$(PY) -m pytest tests/unit -q

notebooks: venv                 ## execute every notebook in quick scale (nbval)
	$(PY) -m pytest $(NBVAL) notebooks/*.ipynb

notebooks-build: venv           ## regenerate notebooks/*.ipynb from notebooks/src + the library
	$(PY) -m tools.nbbuild

student: venv                   ## student edition -> dist/student/ (nbgrader release + stub library)
	$(PY) -m tools.student

grade-demo: venv                ## reference / empty / buggy / hidden-only learners autograded (sandboxed); score table
	bash tools/sandbox_setup.sh
	$(PY) -m tools.grading demo

e2e: venv                       ## only the browser test (JupyterLab in headless Chromium; installs Chromium if missing)
	bash tools/e2e_setup.sh
	VITSEG_E2E=require $(PY) -m pytest tests/e2e -v -p no:cacheprovider

bench: venv                     ## every benchmarks/ script + notebook and grading times -> benchmarks/results/, one table
	$(PY) benchmarks/run_all.py

clean:
	rm -rf dist .pytest_cache
