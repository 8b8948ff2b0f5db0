"""The uplink's connection state machine (core/uplinkstate.py) and the uplink's bookkeeping in process
(service/upstream/uplink.py without spawning the uplink process: the test plays that process's side of the
socketpair, and so decides what "AWS IoT" acknowledges)."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.core import ipc
from gatewayd.core.errors import IllegalTransition
from gatewayd.core.uplinkstate import TRANSITIONS, UplinkEvent, UplinkMachine, UplinkState
from gatewayd.service.upstream.uplink import ChildSpec, Uplink

E, S = UplinkEvent, UplinkState


def test_a_connection_goes_connecting_connected_lost() -> None:
    m = UplinkMachine(now=0.0)
    assert m.state is S.STARTING and not m.connected
    assert m.fire(E.CONNECTING, 1.0) is not None and m.connect_attempts == 1
    t = m.fire(E.CONNACK_OK, 2.0, "")
    assert t is not None and (t.old, t.new) == (S.CONNECTING, S.CONNECTED)
    assert m.connected and m.connected_since == 2.0 and m.since == 2.0
    m.fire(E.CONNECTION_LOST, 5.0, "keepalive timeout")
    assert m.state is S.DISCONNECTED and m.connected_since is None and m.last_error == "keepalive timeout"
    m.fire(E.BACKOFF, 5.5)
    assert m.state is S.WAITING and m.last_error == "keepalive timeout"  # kept until something replaces it
    m.fire(E.CONNECTING, 7.0)
    m.fire(E.CONNACK_OK, 7.1, "")
    assert m.last_error == "" and m.connect_attempts == 2


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.STARTING, E.CONNACK_OK),  # a CONNACK without an attempt
        (S.WAITING, E.CONNACK_OK),
        (S.CONNECTED, E.CONNECTING),  # a second attempt while connected
        (S.CONNECTED, E.BLOCKED),
        (S.CONNECTED, E.SUSPEND),  # suspended only once the process is gone
        (S.WAITING, E.CONNECTION_LOST),
        (S.FAILED, E.CONNACK_REFUSED),
    ],
)
def test_an_impossible_report_raises_and_changes_nothing(state: UplinkState, event: UplinkEvent) -> None:
    m = _machine_in(state)
    before = (m.state, m.since, m.last_error, m.connected_since, m.connect_attempts)
    with pytest.raises(IllegalTransition, match=event.value):
        m.fire(event, 99.0, "x")
    assert (m.state, m.since, m.last_error, m.connected_since, m.connect_attempts) == before


def test_the_process_ending_matters_only_while_live() -> None:
    m = _machine_in(S.WAITING)
    assert m.fire(E.PROCESS_ENDED, 1.0, "uplink process ended") is None and m.state is S.WAITING
    m = _machine_in(S.CONNECTING)
    m.fire(E.PROCESS_ENDED, 1.0, "uplink process ended")
    assert m.state is S.DISCONNECTED and m.last_error == "uplink process ended"


def _machine_in(state: UplinkState) -> UplinkMachine:
    """A machine brought to `state` through legal events."""
    m = UplinkMachine(0.0)
    path = {
        S.STARTING: [],
        S.CONNECTING: [E.CONNECTING],
        S.CONNECTED: [E.CONNECTING, E.CONNACK_OK],
        S.DISCONNECTED: [E.CONNECTING, E.CONNACK_OK, E.CONNECTION_LOST],
        S.WAITING: [E.BACKOFF],
        S.FAILED: [E.CONNECTING, E.CONNECT_FAILED],
        S.REFUSED: [E.CONNECTING, E.CONNACK_REFUSED],
        S.SETUP_FAILED: [E.SETUP_FAILED],
        S.BLOCKED: [E.BLOCKED],
        S.WAITING_FOR_TPM: [E.TPM_ABSENT],
        S.SUSPENDED: [E.SUSPEND],
    }[state]
    for event in path:
        m.fire(event, 0.0)
    assert m.state is state
    return m


def test_every_state_is_reachable_and_every_event_leads_somewhere() -> None:
    targets = {new for _, new in TRANSITIONS.values()}
    assert targets | {S.STARTING} == set(S)
    assert set(TRANSITIONS) == set(E)


@given(st.lists(st.sampled_from(list(E)), max_size=40))
def test_connected_only_after_connecting_whatever_is_reported(events: list[UplinkEvent]) -> None:
    m = UplinkMachine(0.0)
    previous = m.state
    for i, event in enumerate(events):
        try:
            m.fire(event, float(i))
        except IllegalTransition:
            assert m.state is previous
            continue
        if m.state is S.CONNECTED and previous is not S.CONNECTED:
            assert previous is S.CONNECTING
        assert (m.connected_since is not None) == (m.state is S.CONNECTED)
        previous = m.state


# ---------------------------------------------------------------- the uplink's bookkeeping, in process


def sync(test: Callable[..., Any]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return run


class FakeProcess:
    """The uplink process's side of the socketpair: reads PUBLISH frames; AWS IoT's answers are the test's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = ipc.Decoder()
        self.frames: list[ipc.Frame] = []

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            self.frames.extend(self.decoder.feed(data))

    def publishes(self) -> list[ipc.Publish]:
        return [ipc.decode_publish(f.body) for f in self.frames if f.kind == ipc.Kind.PUBLISH]

    def state(self, state: str, **fields: Any) -> None:
        self.writer.write(ipc.json_frame(ipc.Kind.STATE, {"state": state, **fields}))

    def ack(self, ids: list[int], ok: bool = True) -> None:
        self.writer.write(b"".join(ipc.encode_ack(ipc.Ack(i, ok, "")) for i in ids))

    async def end(self) -> None:
        self.writer.close()
        self.task.cancel()


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def _prepare() -> ChildSpec:
    raise AssertionError("not used: the test runs converse() itself")


@sync
async def test_the_window_acknowledgements_and_a_lost_process_requeue_in_order() -> None:
    uplink = Uplink(_prepare, on_message=lambda *a: None, window=3)
    done: list[tuple[int, BaseException | None]] = []
    for n in range(5):
        uplink.send(f"t/{n}", b"%d" % n, 1, functools.partial(lambda n, e: done.append((n, e)), n))
    ours, theirs = socket.socketpair()
    process = FakeProcess(theirs)
    await process.start()
    talk = asyncio.create_task(uplink.converse(ours, ChildSpec({"endpoint": "x"}, {}), 0))
    await _until(lambda: len(process.frames) >= 1)
    assert json.loads(process.frames[0].body)["endpoint"] == "x"  # CONFIG first
    assert process.publishes() == []  # nothing before CONNACK
    process.state("connecting")
    process.state("connected")
    await _until(lambda: len(process.publishes()) == 3)  # the window
    assert uplink.status.state == "connected" and uplink.inflight == 3 and uplink.backlog == 2
    first = [p.id for p in process.publishes()]
    process.ack(first[:2])
    await _until(lambda: len(process.publishes()) == 5)
    assert done == [(0, None), (1, None)]
    await process.end()  # the process dies with three in flight
    await talk
    assert uplink.status.state == "disconnected" and uplink.status.last_error == "uplink process ended"
    assert uplink.inflight == 0 and uplink.backlog == 3  # back at the head of the queue, in order
    ours, theirs = socket.socketpair()
    process = FakeProcess(theirs)
    await process.start()
    talk = asyncio.create_task(uplink.converse(ours, ChildSpec({}, {}), 0))
    process.state("connecting")
    process.state("connected")
    await _until(lambda: len(process.publishes()) == 3)
    assert [p.topic for p in process.publishes()] == ["t/2", "t/3", "t/4"]
    process.ack([p.id for p in process.publishes()])
    await _until(lambda: len(done) == 5)
    assert [n for n, e in done] == [0, 1, 2, 3, 4] and all(e is None for _, e in done)
    await process.end()
    await talk


@sync
async def test_a_report_out_of_order_is_ignored_not_obeyed() -> None:
    uplink = Uplink(_prepare, on_message=lambda *a: None)
    uplink.send("t", b"x", 1, lambda e: None)
    ours, theirs = socket.socketpair()
    process = FakeProcess(theirs)
    await process.start()
    talk = asyncio.create_task(uplink.converse(ours, ChildSpec({}, {}), 0))
    process.state("connected")  # no "connecting" first: not believed
    await asyncio.sleep(0.2)
    assert not uplink.connected and process.publishes() == []
    process.state("connecting")
    process.state("connected")
    await _until(lambda: len(process.publishes()) == 1)
    await process.end()
    await talk
