"""The places for database work: writes leave some to reads, grouped requests wait without one, and a
request that cannot get one in time is told so, holding nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.core.admission import Places, run_in_place

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_writes_leave_places_to_reads() -> None:
    places = Places(3, reserved_for_reads=1)
    first = await places.take(write=True)
    second = await places.take(write=True)
    with pytest.raises(TimeoutError):
        await places.take(write=True, wait=0.05)  # the third place is a read's
    read = await places.take(write=False, wait=0.05)
    with pytest.raises(TimeoutError):
        await places.take(write=False, wait=0.05)  # all three taken
    first()
    third = await places.take(write=True, wait=0.05)  # a write's place came back
    for give_back in (second, read, third):
        give_back()
    # everything came back, the timed-out tries included: all three again
    again = [await places.take(write=False, wait=0.05) for _ in range(3)]
    for give_back in again:
        give_back()


async def test_grouped_requests_wait_without_a_place() -> None:
    places = Places(2, reserved_for_reads=1, grouped_per_place=4)
    waiting = [await places.take(write=True, grouped=True, wait=0.05) for _ in range(8)]
    with pytest.raises(TimeoutError):
        await places.take(write=True, grouped=True, wait=0.05)  # 4 a place, 8 in all
    # the places themselves are all free: a group and a read get theirs at once
    group = await places.take(write=True, wait=0.05)
    read = await places.take(write=False, wait=0.05)
    for give_back in (*waiting, group, read):
        give_back()


async def test_places_are_given_in_arrival_order() -> None:
    places = Places(1, reserved_for_reads=0)
    holder = await places.take(write=True)
    order: list[int] = []

    async def waiter(n: int) -> None:
        give_back = await places.take(write=True, wait=5)
        order.append(n)
        await asyncio.sleep(0)
        give_back()

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(waiter(n)))
        await asyncio.sleep(0)  # each one queued before the next
    holder()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_work_in_a_place_gives_it_back_only_when_its_thread_is_done() -> None:
    places = Places(1, reserved_for_reads=0)
    go_on = threading.Event()
    assert await run_in_place(places, lambda: 42, when=False) == 42  # no place asked for: none taken
    work = asyncio.create_task(run_in_place(places, lambda: go_on.wait(5)))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await places.take(write=True, wait=0.05)  # the work holds the one place
    work.cancel()  # the caller goes (a server stopping), the thread and its connection do not
    with pytest.raises(asyncio.CancelledError):
        await work
    with pytest.raises(TimeoutError):
        await places.take(write=True, wait=0.05)
    go_on.set()
    give_back = await places.take(write=True, wait=2)  # back once the thread ended
    give_back()
