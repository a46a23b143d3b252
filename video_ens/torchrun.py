"""torchrun as launch.sh starts it: the same agent, ending with status 143 after a stop signal it passed on.

torchrun's agent passes a stop signal (SIGTERM, SIGUSR1, ... as launch.sh lists them) on to the ranks, which finish
their step, checkpoint it and exit; the agent then re-raises the signal as an exception, printing a traceback and
exiting 1, which a job script cannot tell from a crash. Here that ending is a one-line message and 143 (128 +
SIGTERM, what a process ended by SIGTERM reports): "stopped, resumable, requeue me". Everything else is torchrun's.
"""

from __future__ import annotations

import signal
import sys

# Exit status after a stop signal: the ranks' own (train.EXIT_STOPPED).
EXIT_STOPPED = 143


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as e:
        name = signal.Signals(e.sigval).name if isinstance(e.sigval, int) else str(e.sigval)
        print(f"launch: {name} passed on to the ranks, which checkpoint the step in flight and stop; relaunch the "
              "same command to resume", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
