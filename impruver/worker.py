"""One rank of a distributed run: ``python -m impruver.worker OUTPUT_DIR/plan.yaml`` (started by accelerate launch).

Workers read the frozen plan written by the main process; they never compose the config again.
"""

from __future__ import annotations

import sys

from impruver.errors import ImpruverError
from impruver.ui import print_error, setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    if len(argv) != 1:
        print_error("usage: python -m impruver.worker PLAN_YAML (started by accelerate launch)")
        return 2
    try:
        from impruver.files import disk_errors
        from impruver.plan import load_plan
        from impruver.train.recipe import run

        plan = load_plan(argv[0])
        with disk_errors(plan.output_dir):
            run(plan, worker=True)
    except ImpruverError as exc:
        print_error(str(exc))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
