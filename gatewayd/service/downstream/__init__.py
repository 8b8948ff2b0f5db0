"""The [downstream] side: the sensors' listeners, the broker and its parts, the certificate registry,
serial sensors."""
