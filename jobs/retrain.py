"""Ray job entry point: `ray job submit -- python -m jobs.retrain --config job.yaml [key=value ...]`."""

import sys

from vlm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
