"""The private Redis the cluster tests run against: started, answering, stopped and back."""

from __future__ import annotations

from tests.services import RedisServer


def test_the_private_redis_answers_and_comes_back_empty_after_a_restart(
    redis_server: RedisServer,
) -> None:
    assert redis_server.command("SET", "a", "1") == b"+OK\r\n"
    redis_server.stop()
    assert not redis_server.accepts()
    redis_server.start()
    assert redis_server.command("GET", "a") == b"$-1\r\n"  # nothing was saved
