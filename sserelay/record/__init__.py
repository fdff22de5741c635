"""Recordings: the format, the recorder and replay."""
