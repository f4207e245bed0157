"""Ray job entry point: `ray job submit -- python -m jobs.pipeline --config job.yaml [key=value ...]`."""

import sys

from vlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
