# The two commands of a fresh machine: `make demo` (the main job, embedded mode)
# and `make test` (the test suite; needs the local PostgreSQL and Redis).
.PHONY: setup demo test test-fast bench

setup:
	bash ops/setup.sh

demo: setup
	.venv/bin/cascade demo

# The whole suite: every test, the local models (marker `models`) and the long drills
# (marker `slow`) included. CI runs this one.
test: setup
	.venv/bin/lint-imports --no-cache
	.venv/bin/pytest -q -ra

# The inner loop: the import contracts and every test that loads no llama.cpp model
# (not `models`) and is not a long drill (not `slow`); under 5 minutes on the 2-core
# machine, still on the real PostgreSQL and Redis. Run `make setup` once before it.
test-fast:
	.venv/bin/lint-imports --no-cache
	.venv/bin/pytest -q -ra -m "not models and not slow"

bench: setup
	.venv/bin/cascade bench pipeline --jobs 2000 --json
