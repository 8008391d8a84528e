# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
.PHONY: setup demo test lint bench

setup:
	@bash pipelines/setup.sh

demo: setup
	.venv/bin/python pipelines/demo.py

test: setup
	.venv/bin/ruff check logitcache tests pipelines
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python pipelines/bench.py --all
