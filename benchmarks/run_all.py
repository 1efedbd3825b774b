"""Every benchmark, side by side in one process. `make bench` runs this."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_jr  # noqa: E402
import bench_layout  # noqa: E402
import bench_methods  # noqa: E402
import bench_pack  # noqa: E402
import bench_precision  # noqa: E402
import bench_members  # noqa: E402
import bench_ray  # noqa: E402
import bench_surrogates  # noqa: E402
import bench_sweep  # noqa: E402
import bench_uap  # noqa: E402

if __name__ == "__main__":
    bench_members.main()
    bench_jr.main()
    bench_precision.main()
    bench_layout.main()
    bench_uap.main()
    bench_methods.main()
    bench_surrogates.main()
    bench_ray.main()
    bench_pack.main()
    bench_sweep.main()
