"""Several instances on one Redis: the topic bus (a stream read by one reader per instance),
the budget store shared by every instance, and heartbeats.

Nothing here is imported unless `--redis` is given (the redis package is the optional
`sserelay[redis]`), except `keys` and `errors`, which import no redis.
"""
