"""How worker processes are started: on this machine (:mod:`.local`); more launchers to come.

A launcher starts a process that runs ``python -m distexec.worker``, hands it the executor's key
without putting it on a command line, and reports the process's exit. Launchers know nothing of
the wire protocol: the worker connects back to the task manager by itself.
"""

from .local import LocalLauncher, LocalProcess, describe_exit

__all__ = ["LocalLauncher", "LocalProcess", "describe_exit"]
