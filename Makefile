# Two entry points, each sets itself up from nothing but python3 and the package registries:
#   make demo   a small real sweep on Fashion-MNIST (Jacobian Ensembles: Ray Tune + Optuna, MLflow in ./mlflow.db)
#   make test   the test suite
#   make reproduce   the four papers' findings and the JE sweep at small scale (docs/RESULTS.md; about 3 h on 2 cores)
#   make reproduce-fair   the fair protocols, three seeds each, then the JE sweep at the fair protocol
#                         (an estimated 21 h on 2 cores; resumable)
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
SYNCED := $(VENV)/.synced-$(shell cat uv.lock pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo test bench reproduce reproduce-fair setup data clean
STUDIES := jacobian-ensembles robust-ensembles ensemble-adv pdd-deg je-sweep

demo: setup data
	$(VENV)/bin/raysweep sweep search_spaces/jacobian_ensembles_sweep.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S) \
		--register jacobian-ensemble

# TEST_WORKERS=2: two pytest workers (pytest-xdist), a test file per worker at a time (--dist loadfile
# keeps a file's module fixtures in one worker), each with one torch/OpenMP thread (tests/conftest.py).
# Not the default: on this 2-core machine it is not reliably faster and it overloads the machine.
# Beside a niced background study, one run after the other: 1488 s against 1725 s in one process (2635
# against 2440 CPU-seconds, cgroup cpuacct); a clean clone then took 1554 s of tests and failed 2 of 310,
# both from load (a local Ray start timed out; a sweep finished before the test could interrupt it).
# With two torch threads per worker: 3165 CPU-seconds (their OpenMP threads spun on each other).
TEST_WORKERS ?= 0
test: setup data
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# One study: make reproduce STUDIES=pdd-deg. Finished runs under runs/reproduce/ are reused.
reproduce: setup data
	for s in $(STUDIES); do $(VENV)/bin/raysweep reproduce $$s || exit 1; done

# An interrupted run continues where it stopped (runs and their progress are kept under
# docs/results/<study>/runs/), so this runs in the background over several sittings. The order puts
# first the studies with no verdict yet: the Jacobian Ensembles study has its verdicts and only its
# checks of the two 9-member ensembles left (hours each on 2 cores). A study whose runs fail does not
# stop the ones after it (its failed runs are retried the next time); the exit status reports it.
FAIR := pdd-deg:pdd_deg_fair ensemble-adv:ensemble_adv_fair robust-ensembles:robust_ensembles_fair \
	jacobian-ensembles:jacobian_ensembles_fair je-sweep:je_sweep_fair
reproduce-fair: setup data
	rc=0; for p in $(FAIR); do $(VENV)/bin/raysweep reproduce $${p%%:*} --study search_spaces/reproduce/$${p##*:}.yaml \
		--out docs/results/$${p##*:}/runs || rc=1; done; exit $$rc

bench: setup data
	$(VENV)/bin/python benchmarks/run_all.py

setup: $(SYNCED)

# uv from PyPI (--isolated: ignore machine pip settings that point at a CPU-only torch wheel with
# which torchvision cannot import); uv then installs the exact versions in uv.lock.
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --isolated --quiet uv==$(UV_VERSION)

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (this machine), every fresh process would
# compile torch, Ray and pandas from source; Ray starts several per run (import 11 s -> 4.5 s).
$(SYNCED): $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen --extra test --compile-bytecode --python $(PYTHON)
	rm -f $(VENV)/.synced-* && touch $@

# Fashion-MNIST offline from Debian's package where apt is usable; elsewhere torchvision downloads it.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "Fashion-MNIST: no Debian package here; torchvision will download it"; fi

clean:
	rm -rf $(VENV) $(TOOLS) runs .pytest_cache
