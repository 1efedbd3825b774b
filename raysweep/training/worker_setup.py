"""What every worker process of a raysweep Ray job runs first (Ray's `worker_process_setup_hook`, set
where raysweep starts or joins Ray): kept light, since Ray starts many small actors that never import
torch."""
from __future__ import annotations

import os

from raysweep.terminal import quiet


def setup() -> None:
    quiet()  # what other libraries would print that the user cannot act on (raysweep.terminal)
    # Ray's State API finds its cluster from RAY_ADDRESS or, without it, by looking for Ray processes on
    # the machine, and fails when it finds two (two local sweeps, or a sweep beside a `ray start`). Ray
    # Train's placement-group cleaner asks that API, from inside the cluster, whether its controller is
    # alive; failing, it dies, and the group of a controller stopped mid-run (ASHA stopping a Ray
    # executor trial) then holds its CPUs until Ray shuts down: the next Ray Train run of the sweep
    # waits for them forever. A worker always means its own cluster.
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
