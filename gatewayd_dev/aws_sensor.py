"""A sensor built on the AWS IoT Device SDK v2 for Python (awsiotsdk), as device makers write them.

python -m gatewayd_dev.aws_sensor HOST PORT CA CERT KEY CLIENT_ID
Connects with mutual TLS, subscribes to commands/<id>/#, publishes one reading on sensors/<id>/temperature,
then waits up to 20 s for one command; prints a JSON line with what happened.
"""

from __future__ import annotations

import json
import sys
import threading

from awscrt import mqtt
from awsiot import mqtt_connection_builder


def main() -> int:
    host, port, ca, cert, key, client_id = sys.argv[1:7]
    got = threading.Event()
    commands: list[str] = []

    def on_command(topic: str, payload: bytes, **kwargs: object) -> None:
        commands.append(f"{topic} {payload.decode()}")
        got.set()

    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=host,
        port=int(port),
        cert_filepath=cert,
        pri_key_filepath=key,
        ca_filepath=ca,
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=30,
    )
    connection.connect().result(15)
    subscribed, _ = connection.subscribe(f"commands/{client_id}/#", mqtt.QoS.AT_LEAST_ONCE, on_command)
    suback = subscribed.result(15)
    published, _ = connection.publish(f"sensors/{client_id}/temperature", b"19.0", mqtt.QoS.AT_LEAST_ONCE)
    published.result(15)
    print(json.dumps({"event": "ready", "suback": str(suback["qos"])}), flush=True)
    got.wait(20)
    connection.disconnect().result(10)
    print(json.dumps({"event": "done", "commands": commands}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
