"""Farm membership: heartbeats, node states, bucket assignment and safe handover.

`core.Membership` is the sans-I/O core the daemon drives (docs/MEMBERSHIP.md), `states` the
node state machine, `assignment` the bucket assignment, `events` what the core tells the daemon.
"""

from vipfarm.membership.core import Membership, MembershipConfig

__all__ = ["Membership", "MembershipConfig"]
