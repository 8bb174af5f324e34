"""The Lua scripts of the Redis backend (RedisState), each run atomically
by Redis: a limited key's check-and-take, a charge after an answer, and the Responses id
map's writes and reads. Rates are GCRA theoretical arrival times (TAT, ms on Redis's
clock; see RedisState), and every script takes the clock from Redis's TIME, so every
replica judges by the same time.

The limits' scripts are flagged `allow-oom`: a Redis full to its maxmemory still counts
and checks (their few small keys are what limits are made of), where a plain script's
first write would fail and the gateway would have to serve without limits (SPEC §13).
The id map's script is not: while Redis refuses writes, ids are dropped and counted.

Holds (SPEC §13's reservations) live in a hash per key, `held`: one field per running
request (`tokens usd partial`) and the sums in the fields `=tokens`, `=usd` and
`=partial`; a sorted set, `held:exp`, names each hold's expiry, so the holds of a
replica that died are let go after HOLD_SECONDS instead of locking the key out.
"""

from __future__ import annotations

HOLD_SECONDS = 3600  # longest a running request's hold is kept without being settled

# KEYS[1] rpm TAT, KEYS[2] tpm TAT, KEYS[3] held, KEYS[4] held:exp, KEYS[5..] the period
# hashes.
_COMMON = """#!lua flags=allow-oom
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local function let_go(id)
  local hold = redis.call('HGET', KEYS[3], id)
  if not hold then return end
  local t, u, p = string.match(hold, '(%S+) (%S+) (%S+)')
  redis.call('HINCRBY', KEYS[3], '=tokens', 0 - tonumber(t))
  redis.call('HINCRBYFLOAT', KEYS[3], '=usd', 0 - tonumber(u))
  redis.call('HINCRBY', KEYS[3], '=partial', 0 - tonumber(p))
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
local function let_go_expired(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 64)) do
    let_go(id)
  end
end
local function charge(now, tpm, tokens, usd, ttl_at)
  if tpm > 0 and tokens > 0 then
    local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
    if tat < now then tat = now end
    tat = tat + tokens * 60000 / tpm
    redis.call('SET', KEYS[2], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
  for i = 5, #KEYS do
    if tokens > 0 then redis.call('HINCRBY', KEYS[i], 'tokens', tokens) end
    if usd > 0 then redis.call('HINCRBYFLOAT', KEYS[i], 'usd', usd) end
    local ttl = tonumber(ARGV[ttl_at + i - 5])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
"""

# ARGV: tpm (0: none), tokens, usd, the number of periods N, each period's TTL, then the
# ids of the holds this charge settles.
CHARGE_SCRIPT = (
    _COMMON
    + """
local n = tonumber(ARGV[4])
for i = 5 + n, #ARGV do let_go(ARGV[i]) end
charge(now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), 5)
return 1
"""
)

# ARGV: [1] rpm, [2] tpm (0: none), [3] quota tokens (-1: none), [4] its period's KEYS
# index, [5] budget usd (-1: none), [6] its index, [7] [8] the pending charge's tokens
# and usd, [9] [10] the ask's prompt and hold tokens, [11] [12] its prompt and hold usd,
# [13] the new hold's id, [14] the number of periods N, [15..14+N] each period's TTL,
# then the ids of the holds the pending charge settles.
# Replies {verdict, amount, requests, tokens, held tokens, held usd, partial}: the verdict
# "ok", "quota", "budget", "rpm" or "tpm"; the amount used (quota, budget) or the ms
# until one more request would pass (rpm, tpm); the ms until the request and token
# levels are full again, for the rate-limit headers of every answer; then what the new
# hold holds (ok), or what running requests hold (quota, budget).
ADMIT_SCRIPT = (
    _COMMON
    + """
local now = now_ms()
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local quota, budget = tonumber(ARGV[3]), tonumber(ARGV[5])
local n = tonumber(ARGV[14])
for i = 15 + n, #ARGV do let_go(ARGV[i]) end
charge(now, tpm, tonumber(ARGV[7]), tonumber(ARGV[8]), 15)
local rtat, ttat = now, now
if rpm > 0 then rtat = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0')) end
if tpm > 0 then ttat = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0')) end
local held_t, held_u, partials = 0, 0, 0
if quota >= 0 or budget >= 0 then
  let_go_expired(now)
  local sums = redis.call('HMGET', KEYS[3], '=tokens', '=usd', '=partial')
  held_t, held_u = tonumber(sums[1] or '0'), tonumber(sums[2] or '0')
  partials = tonumber(sums[3] or '0')
end
local function reply(verdict, amount, rfull, t, u, p)
  return {verdict, amount, string.format('%.3f', rfull - now),
          string.format('%.3f', ttat - now), tostring(t), string.format('%.10f', u),
          tostring(p)}
end
local hold_t, hold_u, partial = 0, 0, 0
local used, spent = 0, 0
if quota >= 0 then
  used = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[4])], 'tokens') or '0')
  local left = quota - used - held_t
  local prompt, ask = tonumber(ARGV[9]), tonumber(ARGV[10])
  if left <= 0 or prompt > left then return reply('quota', tostring(used), rtat, held_t, held_u, partials) end
  hold_t = math.min(ask, left)
  if ask > left then partial = 1 end
end
if budget >= 0 then
  spent = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[6])], 'usd') or '0')
  local left = budget - spent - held_u
  local prompt, ask = tonumber(ARGV[11]), tonumber(ARGV[12])
  if left <= 0 or prompt > left then
    return reply('budget', string.format('%.10f', spent), rtat, held_t, held_u, partials)
  end
  hold_u = math.min(ask, left)
  if ask > left then partial = 1 end
end
if partial == 1 and partials > 0 then
  if quota >= 0 and hold_t < tonumber(ARGV[10]) then
    return reply('quota', tostring(used), rtat, held_t, held_u, partials)
  end
  return reply('budget', string.format('%.10f', spent), rtat, held_t, held_u, partials)
end
local rnew = rtat
if rpm > 0 then
  rnew = rtat + 60000 / rpm
  -- 1 us of slack: rpm requests at one instant must all pass despite rounding.
  if rnew - now > 60000.001 then
    return reply('rpm', string.format('%.3f', rnew - 60000 - now), rtat, 0, 0, 0)
  end
  redis.call('SET', KEYS[1], string.format('%.3f', rnew), 'PX', math.ceil(rnew - now) + 1000)
end
if tpm > 0 and ttat - now >= 60000 then
  return reply('tpm', string.format('%.3f', ttat - now - 60000), rnew, 0, 0, 0)
end
for i = 5, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  local ttl = tonumber(ARGV[15 + i - 5])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
if hold_t > 0 or hold_u > 0 or partial > 0 then
  local id = ARGV[13]
  redis.call('HSET', KEYS[3], id, string.format('%d %.10f %d', hold_t, hold_u, partial))
  redis.call('HINCRBY', KEYS[3], '=tokens', hold_t)
  redis.call('HINCRBYFLOAT', KEYS[3], '=usd', hold_u)
  redis.call('HINCRBY', KEYS[3], '=partial', partial)
  redis.call('ZADD', KEYS[4], now + HOLD_MS, id)
  redis.call('PEXPIRE', KEYS[3], HOLD_MS * 2)
  redis.call('PEXPIRE', KEYS[4], HOLD_MS * 2)
end
return reply('ok', '0', rnew, hold_t, hold_u, partial)
""".replace("HOLD_MS", str(HOLD_SECONDS * 1000))
)

# The Responses id map (SPEC §13): KEYS[1] the id's own key (`owner NL slug NL provider
# NL upstream model`), KEYS[2] the owner's sorted set of its ids by last use, scored in
# microseconds and always above the set's newest (ids made in the same second must
# still leave oldest first). Scores are formatted whole: Lua's own number format keeps
# 14 digits, too few for microseconds since 1970.
_USE_SCORE = """
local function use_score()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if top[2] and tonumber(top[2]) >= now then now = tonumber(top[2]) + 1 end
  return now
end
"""

# REMEMBER: ARGV[1] the value, [2] the owner's share of ids, [3] their TTL in seconds.
# The first creator keeps an id (SET NX); past the share, the owner's least recently
# used ids go. Replies 1 when stored, else the owner the id already has.
REMEMBER_SCRIPT = (
    _USE_SCORE
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[3])) then
  local held = redis.call('GET', KEYS[1]) or ''
  return string.match(held, '^([^\\n]*)') or ''
end
local now = use_score()
redis.call('ZADD', KEYS[2], string.format('%.0f', now), KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf',
           string.format('%.0f', now - tonumber(ARGV[3]) * 1000000))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)  -- member, score, member, ...
  for i = 1, #popped, 2 do redis.call('DEL', popped[i]) end
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""
)

# FIND: KEYS[1] the id's key, KEYS[2] the asker's set; ARGV[1] the asking owner, [2] the
# TTL. The value, its use noted (its rank in the owner's set and its TTL) when the asker
# made it; nil for an id never seen, '' for another tenant's.
FIND_SCRIPT = (
    "#!lua flags=allow-oom\n"
    + _USE_SCORE
    + """
local value = redis.call('GET', KEYS[1])
if not value then return nil end
local owner = string.match(value, '^([^\\n]*)\\n')
if owner ~= ARGV[1] then return '' end
redis.call('ZADD', KEYS[2], 'XX', string.format('%.0f', use_score()), KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return value
"""
)
