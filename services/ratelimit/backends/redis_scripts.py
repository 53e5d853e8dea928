"""Lua for the two Outrider algorithms; same arithmetic as ``core/algorithms.py``.

Each script touches only its KEYS (hash-tagged into one Cluster slot) and takes the
caller's clock in milliseconds, so every replica and the in-memory store agree.
"""

from __future__ import annotations

import hashlib

# KEYS[1] current window counter, KEYS[2] previous window counter
# ARGV: hits, limit, window_ms, now_ms  →  {estimate_after, admitted}
SLIDING_WINDOW = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local hits = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local elapsed = now % window
local estimate = math.ceil(prev * (window - elapsed) / window) + cur
local need = hits
if need < 1 then need = 1 end
if estimate + need > limit then
  return {estimate, 0}
end
if hits > 0 then
  redis.call('INCRBY', KEYS[1], hits)
  redis.call('PEXPIRE', KEYS[1], window * 2)
end
return {estimate + hits, 1}
"""

# KEYS[1] bucket hash {t = tokens, ts = last refill ms}
# ARGV: hits, capacity, window_ms, now_ms  →  {floor(tokens_left), admitted, reset_ms}
TOKEN_BUCKET = """
local hits = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local rate = cap / window
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = cap
else
  local elapsed = now - tonumber(state[2])
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(cap, tokens + elapsed * rate)
end
local need = hits
if need < 1 then need = 1 end
local admitted = 0
local reset
if tokens >= need then
  tokens = tokens - hits
  admitted = 1
  reset = math.ceil((cap - tokens) / rate)
else
  reset = math.ceil((math.min(need, cap) - tokens) / rate)
end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], window + 1000)
return {math.floor(tokens), admitted, reset}
"""


# KEYS[1] fixed-window counter; ARGV: hits, ttl_s, limit  →  count (would-be count if over)
# envoyproxy/ratelimit's INCRBY + EXPIRE, except that hits passing the limit are not stored.
FIXED_CAPPED = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local hits = tonumber(ARGV[1])
if count + hits > tonumber(ARGV[3]) then
  return count + hits
end
count = redis.call('INCRBY', KEYS[1], hits)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
"""


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


SLIDING_SHA = sha1(SLIDING_WINDOW)
TOKEN_SHA = sha1(TOKEN_BUCKET)
FIXED_CAPPED_SHA = sha1(FIXED_CAPPED)
SCRIPTS = {SLIDING_SHA: SLIDING_WINDOW, TOKEN_SHA: TOKEN_BUCKET, FIXED_CAPPED_SHA: FIXED_CAPPED}
