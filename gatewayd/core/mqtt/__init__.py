"""MQTT 3.1.1 and 5.0, sans-IO: packets and the codec (pure core)."""
