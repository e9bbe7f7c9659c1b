# cilia: `make demo` runs the main job, `make test` runs the whole suite.
# Both install what is missing first (scripts/setup.sh is idempotent).
PY := .venv/bin/python

.PHONY: setup demo demo-cluster test bench clean

setup:
	@scripts/setup.sh

demo: setup
	@$(PY) -m cilia.demo

# three simulated nodes on a real etcd (root); CILIA_DEMO_TUNNEL=vxlan for the overlay
demo-cluster: setup
	@$(PY) -m cilia.demo_cluster

test: setup
	@.venv/bin/ruff check cilia tests bench examples/r2d2
	@.venv/bin/mypy
	@$(PY) -m pytest -q --durations=25

bench: setup
	@$(PY) -m bench.policy_resolution
	@$(PY) -m bench.xds_fanout
	@$(PY) -m bench.http_enforcement
	@$(PY) -m bench.bpf_datapath
	@$(PY) -m bench.l7_protocols

clean:
	rm -rf .venv .pytest_cache .hypothesis
