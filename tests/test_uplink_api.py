"""The uplink's API inside the daemon process: per-message acknowledgement, inbound messages for
subscriptions, and at-least-once delivery across a cut connection. Real TPM key, real stand-in."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from gatewayd.service.upstream.link import Upstream, build_trust
from gatewayd.stores.configfile import load
from gatewayd.stores.identity import IdentityStore
from gatewayd_dev.gateway import provision, standin_config, write_config
from gatewayd_dev.observer import Observer
from gatewayd_dev.proxy import RecordingProxy
from gatewayd_dev.stack import DevStack


@pytest.fixture
def setup(devstack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, RecordingProxy]:
    for key, value in {**devstack.tpm.env(), **devstack.standin.gateway_env()}.items():
        monkeypatch.setenv(key, value)
    proxy = RecordingProxy(devstack.standin.endpoint("rsa").port)
    config = write_config(
        tmp_path / "g.toml",
        standin_config(devstack, tmp_path, "gw-api", upstream={"port": proxy.port}, status={"interval": 0}),
    )
    provision(devstack, config)
    yield config, proxy  # type: ignore[misc]
    proxy.close()


async def connected(up: Upstream, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not up.uplink.connected:
        assert time.monotonic() < deadline, up.summary()
        await asyncio.sleep(0.05)


def test_publish_acknowledged_and_commands_delivered(
    setup: tuple[Path, RecordingProxy], devstack: DevStack, tmp_path: Path
) -> None:
    config_path, _proxy = setup
    config = load(config_path)
    observer = Observer(devstack, "telemetry/#", tmp_path / "seen.txt")
    inbound: list[tuple[str, bytes]] = []

    async def scenario() -> None:
        with IdentityStore(Path(config.gateway.state_dir)).locked() as store:
            upstream = Upstream(
                config, store, build_trust(config), on_message=lambda t, p, q, r: inbound.append((t, p))
            )
            async with upstream:
                await connected(upstream)
                await asyncio.gather(
                    *(upstream.uplink.publish(f"telemetry/s{i % 5}", f"m{i}".encode()) for i in range(200))
                )
                upstream.uplink.subscribe("commands/gw-api/#")
                deadline = time.monotonic() + 15
                while not inbound:  # until the subscription is in place upstream
                    assert time.monotonic() < deadline
                    port = str(devstack.standin.observer_port)
                    command = ["-t", "commands/gw-api/reboot", "-m", "now"]
                    subprocess.run(
                        ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", *command], check=True
                    )
                    await asyncio.sleep(0.3)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    time.sleep(0.5)
    seen = observer.stop()
    assert sorted(line.split(" ", 1)[1] for line in seen) == sorted(f"m{i}" for i in range(200))
    assert inbound[0] == ("commands/gw-api/reboot", b"now")


def test_nothing_lost_when_the_connection_is_cut_mid_stream(
    setup: tuple[Path, RecordingProxy], devstack: DevStack, tmp_path: Path
) -> None:
    config_path, proxy = setup
    config = load(config_path)
    observer = Observer(devstack, "telemetry/#", tmp_path / "seen.txt")
    acked: list[int] = []

    async def one(upstream: Upstream, i: int) -> None:
        await upstream.uplink.publish("telemetry/cut", f"m{i}".encode())
        acked.append(i)

    async def scenario() -> None:
        with IdentityStore(Path(config.gateway.state_dir)).locked() as store:
            async with Upstream(config, store, build_trust(config)) as upstream:
                await connected(upstream)
                tasks = [asyncio.create_task(one(upstream, i)) for i in range(600)]
                while len(acked) < 100:
                    await asyncio.sleep(0.005)
                proxy.cut()  # the TCP connection dies with messages in flight
                await asyncio.wait_for(asyncio.gather(*tasks), 40)
                assert upstream.uplink.connected

    asyncio.run(asyncio.wait_for(scenario(), 60))
    time.sleep(0.5)
    seen = [line.split(" ", 1)[1] for line in observer.stop()]
    assert len(proxy.accepts) >= 2, "the connection was not cut"
    assert sorted(acked) == list(range(600))
    missing = {f"m{i}" for i in range(600)} - set(seen)
    assert not missing, f"{len(missing)} acknowledged messages never arrived"
    print(f"{len(seen) - 600} duplicates after the cut (at-least-once)")
