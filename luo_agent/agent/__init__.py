"""The agent layer: the one owner of the phase, and its rooms.

* ``core`` — ``Agent``: the event queue, ``phase.step`` applied in one place, the effects
  dispatched to the rooms; the requests the D-Bus layer makes.
* ``state`` — what the rooms share: ``AgentState`` (phase, update in hand, kernel), the kernel
  thread, the listeners' port.
* ``ledger`` — the update's record: begun, saved, announced, ended, kept in the history.
* ``gates`` — the phase targets' systemd jobs and the participants' states.
* ``custody`` — the fds and the kexec image in the agent's hands, the kernel's steps, the kexec.
* ``watchers`` — what others change behind the agent's back (kernel state, shutdown jobs).
* ``startup`` — opening the kernel, the reboot strategy, recovery after a restart or a reboot.
* ``fleet`` — this host's slot in the fleet: taken before the freeze, released after the update.

The rooms import ``state`` and the layers below (``phase``, ``registry``, the adapters' ports,
``kexec_handover``); ``core`` alone imports the rooms.  Nothing here imports ``dbus`` or
``daemon`` (``tests/unit/test_layers.py``).
"""

from .core import Agent
from .custody import CheckReport, LoadedKernel
from .state import UPDATE_ID_RE, AgentListener

__all__ = ["UPDATE_ID_RE", "Agent", "AgentListener", "CheckReport", "LoadedKernel"]
