"""Simulated sensors for the demo: a few paho clients publishing telemetry, and a valve that obeys commands.

python -m gatewayd_dev.sensors_sim PORT CA_FILE CERT_DIR      (CERT_DIR holds <id>.pem and <id>.key)
Runs until SIGTERM/SIGINT; prints one line per event.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from pathlib import Path

from gatewayd_dev.sensor import Sensor

TELEMETRY = [("temp-kitchen", False), ("temp-cellar", True), ("humidity-attic", False)]  # (id, MQTT 5.0)
VALVE = "valve-1"


def main() -> int:
    port, ca, certs = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sensors = [
        Sensor(cid, port, ca, certs / f"{cid}.pem", certs / f"{cid}.key", mqtt5) for cid, mqtt5 in TELEMETRY
    ]
    valve = Sensor(VALVE, port, ca, certs / f"{VALVE}.pem", certs / f"{VALVE}.key", True)
    for s in [*sensors, valve]:
        code = s.connect()
        print(f"{s.client_id} connected (MQTT {'5.0' if s.mqtt5 else '3.1.1'}, CONNACK {code})", flush=True)
    valve.subscribe(f"commands/{VALVE}/#")
    print(f"{VALVE} subscribed to commands/{VALVE}/#", flush=True)
    seen, state, rng = 0, "closed", random.Random(1)
    next_reading = 0.0
    while running:
        now = time.monotonic()
        if now >= next_reading:
            for s in sensors:
                value = round(
                    rng.uniform(15, 25) if s.client_id.startswith("temp") else rng.uniform(30, 60), 1
                )
                body = json.dumps({"value": value, "valve": state if s is sensors[0] else None}).encode()
                s.publish(f"sensors/{s.client_id}/reading", body, qos=1)
            print(f"published {len(sensors)} readings (QoS 1, acknowledged)", flush=True)
            next_reading = now + 3
        while seen < len(valve.received):
            topic, payload, _qos = valve.received[seen]
            seen += 1
            state = payload.decode(errors="replace")
            print(f"{VALVE} received {topic}: {state!r}; valve is now {state}", flush=True)
            valve.publish(f"sensors/{VALVE}/state", state.encode(), qos=1)
        time.sleep(0.1)
    for s in [*sensors, valve]:
        s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
