"""Writing streams to clients: stream_sse(), relay_frames(), relays and the hub."""
