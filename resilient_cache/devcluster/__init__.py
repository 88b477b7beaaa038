"""A throwaway local Redis Cluster built from the ``redis-server`` binary.

:class:`DevCluster` starts six ``redis-server`` processes (three primaries, three
replicas by default) on free loopback ports, each in its own directory under a
temporary directory, joins them into a cluster with plain admin commands and
waits until the cluster is really usable. It is what the test fixtures, the chaos
tests, ``resilient-cache cluster up|down|status`` and ``make demo`` run against.
:class:`StandaloneServer` is the same for one plain (non-cluster) server.

``DevCluster(tls=True)`` serves TLS only (certificates made with ``openssl`` in the
cluster's directory), ``DevCluster(acl=("user", "password"))`` turns the default user
off; ``cluster.connection_options`` and ``cluster.client_environment`` say how to connect.

Typical use::

    with DevCluster() as cluster:
        client = RedisCluster.from_url(f"redis://{cluster.nodes[0].address}")
        victim = cluster.primary_for_key("user:1")
        cluster.kill(victim)
        cluster.wait_failover(victim)
        cluster.restart(victim)  # comes back as a replica of the new primary
        cluster.wait_ready()

Design notes for newcomers:

* Everything binds to a loopback address only; nothing here is reachable from
  another machine.
* The cluster is formed with redis-py (``CLUSTER MEET``/``ADDSLOTSRANGE``/
  ``REPLICATE``) rather than ``redis-cli --cluster create``, because ``redis-cli``
  is not always installed next to ``redis-server``.
* Every wait polls a condition against a deadline and, on timeout, says which
  node failed which condition. Nothing sleeps and hopes.
* Servers must never outlive the process that owns them by accident: on Linux
  each one gets ``PR_SET_PDEATHSIG=SIGKILL`` and an ``atexit`` hook stops every
  cluster still running. ``tie_to_parent=False`` turns both off for the CLI's
  ``cluster up``, which records the cluster in a state file instead so that
  ``cluster down`` can find it later.

The modules, each with one job:

``cluster``     :class:`DevCluster`, composing the modules below
``standalone``  :class:`StandaloneServer`, one plain server
``node``        :class:`DevNode`, :class:`NodeStatus`, cluster constants
``errors``      :class:`DevClusterError` and the port-race error
``ports``       loopback checks and the free-port search
``config``      the ``redis.conf`` text
``tls``         the certificates of a TLS cluster, made with ``openssl``
``security``    TLS and ACL: the ACL file, admin connection options, client variables
``processes``   finding ``redis-server``, spawning it tied to this process, pids, signals, reaping
``waits``       polling against a deadline
``admin``       per-node admin clients and parsed replies (``ROLE``, ``CLUSTER SLOTS`` ...)
``roster``      a cluster's nodes and which are live
``topology``    forming the cluster; slot maps; readiness problems
``queries``     roles, replicas, the owner of a key, status rows
``faults``      kill, pause, resume and waiting for the failover
``state``       the state file of a detached cluster
"""

from __future__ import annotations

from .cluster import DevCluster
from .errors import DevClusterError
from .node import BUS_PORT_OFFSET, TOTAL_SLOTS, DevNode, NodeStatus
from .ports import pick_free_ports
from .processes import find_redis_server
from .security import AclUser
from .standalone import StandaloneServer
from .state import STATE_FILE_VERSION, default_state_path

__all__ = [
    "BUS_PORT_OFFSET",
    "STATE_FILE_VERSION",
    "TOTAL_SLOTS",
    "AclUser",
    "DevCluster",
    "DevClusterError",
    "DevNode",
    "NodeStatus",
    "StandaloneServer",
    "default_state_path",
    "find_redis_server",
]

# DevCluster picks its ports through this name, looked up here at each start, so
# that a test can replace it to simulate losing a port race.
_pick_free_ports = pick_free_ports
