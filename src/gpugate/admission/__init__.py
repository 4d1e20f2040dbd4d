"""Where the admission decision is made: the gate, its decisions, leases and tickets."""

from ._decision import Decision, Outcome, Reason
from ._gate import Gate
from ._lease import Lease
from ._ticket import Ticket

__all__ = ["Decision", "Gate", "Lease", "Outcome", "Reason", "Ticket"]
