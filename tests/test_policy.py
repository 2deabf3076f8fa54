"""Lambda's scaling policy and the loop's timers on a fake clock, without processes: routing, the
scaling-rate token bucket, account and reserved concurrency with their throttle reasons, lazy timer
cancellation, and timers that re-arm themselves yielding to I/O."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

import pytest

from emulator.errors import UsageError
from emulator.function import Account, IdlePool, ScalingTokens, check_reservations
from emulator.loop import FakeClock, Loop


@dataclass(eq=False)
class Env:
    id: int
    use_seq: int = 0
    idle_token: int = 0
    state: str = "frozen"


def pool_order(routing: str, envs: list[Env], seed: int = 1) -> list[int]:
    pool = IdlePool(routing, random.Random(seed))
    for env in envs:
        pool.push(env)
    order = []
    while (env := pool.pop()) is not None:
        order.append(env.id)
    return order


def test_routing_orders_idle_environments_by_strategy():
    envs = [Env(1, use_seq=30), Env(2, use_seq=10), Env(3, use_seq=20)]
    assert pool_order("newest", envs) == [3, 2, 1]
    assert pool_order("oldest", envs) == [1, 2, 3]
    assert pool_order("mru", envs) == [1, 3, 2]
    assert pool_order("lru", envs) == [2, 3, 1]
    random_orders = {tuple(pool_order("random", envs, seed)) for seed in range(20)}
    assert len(random_orders) > 1 and all(sorted(o) == [1, 2, 3] for o in random_orders)


def test_idle_pool_skips_discarded_and_busy_environments_and_stays_small():
    pool = IdlePool("newest", random.Random(0))
    envs = [Env(i) for i in range(1, 201)]
    for env in envs:
        pool.push(env)
    for env in envs[:150]:
        pool.discard(env)  # reclaimed while idle
    envs[199].state = "busy"  # taken out by other means: its stale entry must not be handed out
    assert len(pool) == 50
    # Stale entries were compacted away instead of piling up for the rest of the run.
    assert pool.heap_size() <= 2 * len(pool) + 64
    assert pool.pop().id == 199


def test_scaling_tokens_refill_continuously():
    clock = FakeClock()
    bucket = ScalingTokens(10, 10.0, clock)  # 10 environments per 10 s: one per second
    assert all(bucket.take() for _ in range(10))
    assert not bucket.take()
    clock.advance(0.5)
    assert not bucket.take()
    clock.advance(0.5)
    assert bucket.take() and not bucket.take()
    clock.advance(100)
    assert bucket.available() == 10  # never above the bucket's size


def test_unreserved_functions_share_what_reservations_leave():
    clock = FakeClock()
    account = Account(300, clock)
    api = account.add_function("api", reserved=None, scale_rate=(1000, 10.0))
    worker = account.add_function("worker", reserved=None, scale_rate=(1000, 10.0))
    billing = account.add_function("billing", reserved=100, scale_rate=(1000, 10.0))
    assert account.unreserved_limit == 200
    for _ in range(150):
        api.started()
    for _ in range(50):
        worker.started()
    # The shared part is full: both unreserved functions are throttled by the account...
    assert api.admit() == "account_concurrency" and worker.admit() == "account_concurrency"
    # ...while the reserved one keeps its reservation...
    assert billing.admit() == ""
    for _ in range(100):
        billing.started()
    # ...and is throttled by it, not by the account.
    assert billing.admit() == "reserved_concurrency"
    api.stopped()
    assert worker.admit() == "" and account.in_flight() == 299


def test_scale_rate_throttles_only_new_environments():
    clock = FakeClock()
    account = Account(1000, clock)
    f = account.add_function("f", reserved=None, scale_rate=(2, 10.0))
    assert f.admit_new_environment() == "" and f.admit_new_environment() == ""
    assert f.admit_new_environment() == "scale_rate"
    assert f.admit() == ""  # a warm invocation needs no token
    clock.advance(5)
    assert f.admit_new_environment() == ""


def test_reservations_must_leave_100_unreserved():
    check_reservations(1000, [("a", 450), ("b", 450), ("c", None)])
    with pytest.raises(UsageError) as err:
        check_reservations(1000, [("a", 600), ("b", 350)])
    text = str(err.value)
    assert "a 600" in text and "b 350" in text and "sum 950" in text and "1050" in text
    with pytest.raises(UsageError, match="--reserved-concurrency 50"):
        check_reservations(120, [("app", 50)], reserved_flag="--reserved-concurrency")


def test_timers_run_in_order_and_cancelled_ones_keep_nothing_alive():
    clock = FakeClock()
    loop = Loop(clock)
    ran: list[str] = []
    payload = object()
    loop.call_later(2.0, ran.append, "b")
    loop.call_later(1.0, ran.append, "a")
    cancelled = loop.call_later(1.5, ran.append, payload)
    cancelled.cancel()
    assert cancelled.args == () and cancelled.callback is None  # the payload is not referenced any more
    while loop.next_timer() is not None:
        loop.run_once()
    assert ran == ["a", "b"]
    assert clock() == pytest.approx(1002.0)
    loop.close()


def test_a_timer_that_rearms_itself_lets_io_in_between():
    # An arrival backlog re-arms its timer for a time already past; the loop must still read sockets.
    clock = FakeClock()
    loop = Loop(clock)
    a, b = socket.socketpair()
    seen: list[str] = []
    loop.add_reader(a, lambda: seen.append(f"io {a.recv(16).decode()}"))
    count = 0

    def backlog() -> None:
        nonlocal count
        count += 1
        seen.append("batch")
        if count == 1:
            b.send(b"reply")  # a reply arrives while the backlog is being worked through
        if count < 3:
            loop.call_at(clock() - 1, backlog)  # overdue again

    loop.call_at(clock(), backlog)
    for _ in range(4):
        loop.run_once()
    assert seen == ["batch", "io reply", "batch", "batch"]
    loop.close()
    a.close()
    b.close()
