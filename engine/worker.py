"""A stage worker's entry point: ``python -m engine.worker FD`` (started by engine/stage.py).

SIGINT is ignored first: the command line alone decides what an interrupt means (a
stop at a safe point, then an abort), and its coordinator stops the workers. Then the
worker reads its start record from its channel (descriptor FD) and runs its handler's
loop.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import sys  # after the signal, on purpose

from engine.stage import boot_worker

boot_worker(int(sys.argv[1]))
