# The two set-up commands the README promises; each makes its own venv.
PYTHON ?= python3

.PHONY: demo test lint clean

demo: .venv-demo/.installed
	.venv-demo/bin/python -m sparsejit.demo

test: .venv-test/.installed
	.venv-test/bin/python -m pytest -q

lint: .venv-test/.installed
	.venv-test/bin/ruff check .

.venv-demo/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-demo
	.venv-demo/bin/pip install -q --disable-pip-version-check .
	touch $@

.venv-test/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-test
	.venv-test/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf .venv-demo .venv-test build *.egg-info
