"""The Lua scripts sserelay runs in Redis. Each is atomic: what it reads and writes cannot
interleave with another instance's.

Numbers cross into Lua as doubles: exact up to 2^53, far above any count or millisecond
here. They leave as strings formatted with %.0f, so no exponent ever reaches a key. A
negation is written `0 - x`: `-x` of 0 is -0, which Redis does not take as an integer.
A script that fails stops where it failed, without undoing what it did: each checks what
it needs before it writes.
"""

from __future__ import annotations

#: Publish batches of events to a topic, their ids taken from Redis' clock.
#:
#: KEYS[1] the stream, KEYS[2] the topic's state (ms, seq: the last id; k: the number the
#: next event gets; pub, num: the last publisher and the number of its last batch stored).
#: ARGV[1] the publisher's id, ARGV[2] the number of this call's first batch (counting per
#: publisher), ARGV[3..5] the floor (ms, seq, k): what the publisher last saw stored, so ids
#: and numbers go on rising even if Redis lost the state; ARGV[6] an id to trim the stream
#: to (XTRIM MINID ~; '' for none); then five per batch: n (its events; 0 for the end of
#: the stream), the field of its texts ('c' or 'j'), its texts (the end: its error, '' if
#: none), its tokens (the end: the tokens counted at the end), what the count holds back
#: after it (see topic.py for the entry's fields).
#:
#: A batch of n events gets the ids ms-(s+1) ... ms-(s+n), s the last seq (or -1 in a new
#: millisecond), and is stored as one entry whose id is its last event's; `k` is its first
#: event's number. The end takes one id of its own. A call already stored (the publisher
#: retrying after a lost reply) is not stored again. Returns {1, ms, the next k, the call's
#: first k, the last seq of each batch...}, or {0, ms, k, k, seq} for a call stored before.
PUBLISH = r"""
local state = redis.call('HMGET', KEYS[2], 'ms', 'seq', 'k', 'pub', 'num')
local first_num = tonumber(ARGV[2])
if state[4] == ARGV[1] and state[5] and tonumber(state[5]) >= first_num then
  return {0, state[1], state[3], state[3], state[2]}
end
local ms, seq, k = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if state[1] then
  local sms, sseq = tonumber(state[1]), tonumber(state[2])
  if sms > ms or (sms == ms and sseq > seq) then ms, seq = sms, sseq end
  if tonumber(state[3]) > k then k = tonumber(state[3]) end
else
  -- no state (never published, or lost): past the stream's newest entry, if it has one
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #newest > 0 then
    local id = newest[1][1]
    local dash = string.find(id, '-', 1, true)
    local sms, sseq = tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
    if sms > ms or (sms == ms and sseq > seq) then ms, seq = sms, sseq end
  end
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if now > ms then ms, seq = now, -1 end
local batches = (#ARGV - 6) / 5
local reply = {1, string.format('%.0f', ms), '', string.format('%.0f', k)}
for b = 0, batches - 1 do
  local at = 7 + 5 * b
  local n = tonumber(ARGV[at])
  local kk = string.format('%.0f', k)
  if n > 0 then
    seq = seq + n
    redis.call('XADD', KEYS[1], string.format('%.0f-%.0f', ms, seq),
      'k', kk, ARGV[at + 1], ARGV[at + 2], 't', ARGV[at + 3], 'p', ARGV[at + 4])
    k = k + n
  else
    seq = seq + 1
    redis.call('XADD', KEYS[1], string.format('%.0f-%.0f', ms, seq),
      'k', kk, 'e', ARGV[at + 2], 'x', ARGV[at + 3])
  end
  reply[#reply + 1] = string.format('%.0f', seq)
end
if ARGV[6] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[6])
end
reply[3] = string.format('%.0f', k)
redis.call('HSET', KEYS[2], 'ms', reply[2], 'seq', string.format('%.0f', seq),
  'k', reply[3], 'pub', ARGV[1], 'num', string.format('%.0f', first_num + batches - 1))
return reply
"""

#: Drop the leases of an account that have expired (their instance died): what each holds
#: is counted as spent, since its instance may have delivered all of it. Shared by the
#: budget scripts below, which start with it. KEYS[1] the account, KEYS[2] its leases.
_EXPIRE_LEASES = r"""
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, lease in ipairs(dead) do
  local held = redis.call('HMGET', KEYS[1], 'rt:' .. lease, 'ru:' .. lease)
  local t, u = tonumber(held[1] or '0'), tonumber(held[2] or '0')
  redis.call('HINCRBY', KEYS[1], 'ct', t)
  redis.call('HINCRBY', KEYS[1], 'cu', u)
  redis.call('HINCRBY', KEYS[1], 'rt', 0 - t)
  redis.call('HINCRBY', KEYS[1], 'ru', 0 - u)
  redis.call('HDEL', KEYS[1], 'rt:' .. lease, 'ru:' .. lease)
  redis.call('ZREM', KEYS[2], lease)
end
local function state()
  local s = redis.call('HMGET', KEYS[1], 'ct', 'cu', 'rt', 'ru')
  return {s[1] or '0', s[2] or '0', s[3] or '0', s[4] or '0'}
end
local function keep(expire_at)
  if expire_at ~= '' then
    redis.call('PEXPIREAT', KEYS[1], expire_at)
    redis.call('PEXPIREAT', KEYS[2], expire_at)
  end
end
"""

#: Reserve budget for a lease: at least `need` in every capped dimension, or nothing.
#:
#: ARGV: lease, need tokens, need units, cap tokens, cap units ('' where not capped), block
#: tokens, block units, lease TTL (ms), when the account's keys may go (ms, '' for never).
#: Grants max(need, block) in each capped dimension, capped by what is left (cap less spent
#: and reserved by every instance). Returns {granted tokens, granted units, the state}.
RESERVE = (
    _EXPIRE_LEASES
    + r"""
local s = state()
local need = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local caps = {ARGV[4], ARGV[5]}
local blocks = {tonumber(ARGV[6]), tonumber(ARGV[7])}
local grant = {0, 0}
for d = 1, 2 do
  if caps[d] ~= '' then
    local left = tonumber(caps[d]) - tonumber(s[d]) - tonumber(s[d + 2])
    if need[d] > left or left < 0 then
      return {'0', '0', s[1], s[2], s[3], s[4]}
    end
    grant[d] = math.min(left, math.max(need[d], blocks[d]))
  end
end
local lease = ARGV[1]
if grant[1] > 0 or grant[2] > 0 then
  redis.call('HINCRBY', KEYS[1], 'rt', grant[1])
  redis.call('HINCRBY', KEYS[1], 'ru', grant[2])
  redis.call('HINCRBY', KEYS[1], 'rt:' .. lease, grant[1])
  redis.call('HINCRBY', KEYS[1], 'ru:' .. lease, grant[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[8]), lease)
  keep(ARGV[9])
end
s = state()
return {string.format('%.0f', grant[1]), string.format('%.0f', grant[2]), s[1], s[2], s[3], s[4]}
"""
)

#: Settle a lease: commit what was used and release what it holds. ARGV: lease, used
#: tokens, used units, when the account's keys may go, granted tokens, granted units. A
#: lease that expired meanwhile was counted as spent in full (what was granted): only what
#: was used beyond it (a charged input cost) is added. Returns the state.
SETTLE = (
    _EXPIRE_LEASES
    + r"""
local lease = ARGV[1]
local held = redis.call('HMGET', KEYS[1], 'rt:' .. lease, 'ru:' .. lease)
local used = {tonumber(ARGV[2]), tonumber(ARGV[3])}
if held[1] or held[2] then
  local t, u = tonumber(held[1] or '0'), tonumber(held[2] or '0')
  redis.call('HINCRBY', KEYS[1], 'rt', 0 - t)
  redis.call('HINCRBY', KEYS[1], 'ru', 0 - u)
  redis.call('HDEL', KEYS[1], 'rt:' .. lease, 'ru:' .. lease)
  redis.call('ZREM', KEYS[2], lease)
  redis.call('HINCRBY', KEYS[1], 'ct', used[1])
  redis.call('HINCRBY', KEYS[1], 'cu', used[2])
else
  local granted = {tonumber(ARGV[5]), tonumber(ARGV[6])}
  redis.call('HINCRBY', KEYS[1], 'ct', math.max(0, used[1] - granted[1]))
  redis.call('HINCRBY', KEYS[1], 'cu', math.max(0, used[2] - granted[2]))
end
keep(ARGV[4])
return state()
"""
)

#: Seed an account with what the ledger says it spent, unless Redis already knows it.
#: ARGV: tokens, units, when its keys may go. Returns the state.
SEED = (
    _EXPIRE_LEASES
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'ct', ARGV[1], 'cu', ARGV[2], 'rt', '0', 'ru', '0')
  keep(ARGV[3])
end
return state()
"""
)

#: Renew the leases of this instance that are still open (ARGV: TTL ms, then the leases),
#: and read the account. Returns the state.
RENEW = (
    _EXPIRE_LEASES
    + r"""
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
  end
end
return state()
"""
)

#: Beat this instance's heartbeat (on Redis' clock: the instances' own clocks may differ),
#: and take the instances that have stopped beating out of the set (whoever sees them first,
#: so one survivor recovers each). KEYS[1] the set; ARGV[1] this instance, ARGV[2] dead
#: after (ms). Returns the dead instances.
BEAT = r"""
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
for _, instance in ipairs(dead) do
  redis.call('ZREM', KEYS[1], instance)
end
return dead
"""
