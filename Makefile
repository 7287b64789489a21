# The two commands of a fresh machine: `make demo` (the main job, embedded mode)
# and `make test` (the test suite; needs the local PostgreSQL and Redis).
.PHONY: setup demo test bench

setup:
	bash ops/setup.sh

demo: setup
	.venv/bin/cascade demo

test: setup
	.venv/bin/lint-imports --no-cache
	.venv/bin/pytest -q -ra

bench: setup
	.venv/bin/cascade bench pipeline --jobs 2000 --json
