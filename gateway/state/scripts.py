"""The Lua scripts of the Redis backend (gateway/state/redis.py), each run atomically
by Redis: a limited key's check-and-take, and a charge after an answer. Both keep rates
as GCRA theoretical arrival times (TAT, ms on Redis's clock; see redis.py), and both
take the clock from Redis's TIME, so every replica judges by the same time."""

from __future__ import annotations

# Applies a charge to KEYS[2] (the tpm TAT) and KEYS[3..] (the period hashes); ARGV[1]
# is tpm (0: none), ARGV[2] tokens, ARGV[3] usd, ARGV[4..] each period's TTL.
_CHARGE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local function charge(now, tpm, tokens, usd, ttl_at)
  if tpm > 0 and tokens > 0 then
    local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
    if tat < now then tat = now end
    tat = tat + tokens * 60000 / tpm
    redis.call('SET', KEYS[2], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
  for i = 3, #KEYS do
    if tokens > 0 then redis.call('HINCRBY', KEYS[i], 'tokens', tokens) end
    if usd > 0 then redis.call('HINCRBYFLOAT', KEYS[i], 'usd', usd) end
    local ttl = tonumber(ARGV[ttl_at + i - 3])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
"""

CHARGE_SCRIPT = (
    _CHARGE
    + """
charge(now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), 4)
return 1
"""
)

# KEYS: rpm TAT, tpm TAT, the period hashes. ARGV: rpm, tpm (0: none), quota tokens,
# its period's KEYS index, budget usd (-1: none), its index, the pending charge's tokens
# and usd, then each period's TTL. Replies {verdict, amount, requests, tokens}: the
# verdict "ok", "quota", "budget", "rpm" or "tpm"; the amount used (quota, budget) or
# the ms until one more request would pass (rpm, tpm); then the ms until the request and
# token levels are full again, for the rate-limit headers of every answer.
ADMIT_SCRIPT = (
    _CHARGE
    + """
local now = now_ms()
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local quota, budget = tonumber(ARGV[3]), tonumber(ARGV[5])
charge(now, tpm, tonumber(ARGV[7]), tonumber(ARGV[8]), 9)
local rtat, ttat = now, now
if rpm > 0 then rtat = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0')) end
if tpm > 0 then ttat = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0')) end
local function reply(verdict, amount, rfull)
  return {verdict, amount, string.format('%.3f', rfull - now), string.format('%.3f', ttat - now)}
end
if quota >= 0 then
  local used = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[4])], 'tokens') or '0')
  if used >= quota then return reply('quota', tostring(used), rtat) end
end
if budget >= 0 then
  local spent = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[6])], 'usd') or '0')
  if spent >= budget then return reply('budget', string.format('%.10f', spent), rtat) end
end
local rnew = rtat
if rpm > 0 then
  rnew = rtat + 60000 / rpm
  -- 1 us of slack: rpm requests at one instant must all pass despite rounding.
  if rnew - now > 60000.001 then
    return reply('rpm', string.format('%.3f', rnew - 60000 - now), rtat)
  end
  redis.call('SET', KEYS[1], string.format('%.3f', rnew), 'PX', math.ceil(rnew - now) + 1000)
end
if tpm > 0 and ttat - now >= 60000 then
  return reply('tpm', string.format('%.3f', ttat - now - 60000), rnew)
end
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  local ttl = tonumber(ARGV[9 + i - 3])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
return reply('ok', '0', rnew)
"""
)
