# The two commands of a fresh machine: `make demo` (the main job, embedded mode)
# and `make test` (the test suite; needs the local PostgreSQL and Redis).
.PHONY: setup demo demo-cluster test test-fast bench

setup:
	bash ops/setup.sh

demo: setup
	.venv/bin/cascade demo

# The distributed mode on this machine: a llama-cpp-python server per local model, the
# machine's Redis and PostgreSQL, one `cascade worker` per tier, `cascade serve` and
# Flower; the demo's questions as an OpenAI batch through the openai SDK. It stops
# everything it started (see `cascade demo --help` for --hold, --flower-port).
demo-cluster: setup
	.venv/bin/cascade demo --cluster

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

# The production image (docker/Dockerfile), tagged as ops/k8s/ expects: with Docker where
# a Docker daemon answers, else with podman (a local Debian base made once). LOCAL=1 adds
# llama.cpp and the local model pack. See docs/operations.md#the-image.
.PHONY: image
image:
	bash docker/build.sh

# docker/compose.yaml started for real with podman-compose (docker/compose.podman.yaml on
# top: host network, Redis/PostgreSQL/Prometheus from Debian's packages), checked, removed.
.PHONY: compose-check
compose-check: setup
	.venv/bin/python docker/podman/compose_check.py check
