"""The [upstream] side: the gateway's identity, the uplink process to AWS IoT Core, renewal and trust."""
