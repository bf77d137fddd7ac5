# The two set-up commands the README promises; each makes its own venv.
PYTHON ?= python3

.PHONY: demo test lint bench clean

# (run from inside the venv: in the checkout's root, its sparsejit/ would shadow the installed package)
demo: .venv-demo/.installed
	cd .venv-demo && bin/python -m sparsejit.demo

test: .venv-test/.installed
	.venv-test/bin/python -m pytest -q

lint: .venv-test/.installed
	.venv-test/bin/ruff check .

# Not part of CI: ~90 minutes, and the DeepSparse venv (see bench/README.md).
bench: .venv-test/.installed bench/.venv-deepsparse/bin/python bench/.venv-openvino/bin/python
	.venv-test/bin/python bench/make_models.py
	.venv-test/bin/python bench/run.py --runs 30 --rounds 10
	.venv-test/bin/python bench/embed_throughput.py
	.venv-test/bin/python bench/serve_load.py
	.venv-test/bin/python bench/ray_scaling.py
	.venv-test/bin/python bench/contention.py

bench/.venv-openvino/bin/python:
	$(PYTHON) -m venv bench/.venv-openvino
	bench/.venv-openvino/bin/pip install -q openvino onnx numpy

bench/.venv-deepsparse/bin/python:
	python3.11 -m venv bench/.venv-deepsparse
	# [server,transformers]: its text pipelines and server (embed_throughput.py, serve_load.py); pyarrow < 15: the last built for numpy 1
	bench/.venv-deepsparse/bin/pip install -q 'deepsparse[server,transformers]==1.8.0' 'pyarrow<15'

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
