"""Upstreams for the end-to-end tests of the proxy and of recording."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_httpserver import HTTPServer


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[HTTPServer]:
    # Threaded: HTTP/1.1 with chunked bodies, and concurrent requests really are concurrent.
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture
def upstream(threaded_server: HTTPServer) -> Iterator[HTTPServer]:
    """A pytest-httpserver upstream, its expectations cleared around each test."""
    threaded_server.clear()
    yield threaded_server
    threaded_server.clear()
