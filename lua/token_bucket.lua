--[[
tollgate token bucket (SPEC section 2), atomic in Redis.

KEYS[1]  the bucket's key (a hash with fields `tokens` and `ts`). The script touches this key only,
         so it runs unchanged on Redis Cluster.
ARGV[1]  capacity: bucket size (finite, > 0)
ARGV[2]  rate: refill in tokens per second (finite, > 0)
ARGV[3]  cost: tokens to take, check or refund (finite, > 0; the caller turns a check of 0 into 1)
ARGV[4]  mode: 1 take, 2 check only (writes nothing), 3 refund

Returns  { allowed (1 or 0), tokens_remaining (a string, "%.17g", so no precision is lost),
           retry_after_ms, reset_after_ms }

Hardening carried over from the origin project:
- time comes from the server (TIME), so every replica of tollgate sees one clock;
- elapsed time is clamped to [0, full refill]: a clock that steps back adds nothing;
- tokens are capped at capacity;
- the key expires after the full-refill time of idleness, when it would be full anyway;
- every argument must be a finite positive number: anything else is a Redis error, never a default.

The arithmetic is written in the same order as src/core/bucket.rs so both give the same doubles.
--]]

local MAX_TTL_MS = 9007199254740991 -- 2^53 - 1, the same bound as core::MAX_TTL_MS

local function positive(index, name)
  local raw = ARGV[index]
  local value = tonumber(raw)
  -- tonumber accepts "nan" and "inf" (strtod), so test them explicitly.
  if value == nil or value ~= value or value == math.huge or value == -math.huge or value <= 0 then
    return redis.error_reply("ERR tollgate: " .. name .. " must be a finite number > 0, got '" .. tostring(raw) .. "'")
  end
  return value
end

local args = {}
local names = { "capacity", "rate", "cost", "mode" }
for i = 1, 4 do
  local value = positive(i, names[i])
  if type(value) == "table" then
    return value
  end
  args[i] = value
end
local capacity, rate, cost, mode = args[1], args[2], args[3], args[4]
if mode ~= 1 and mode ~= 2 and mode ~= 3 then
  return redis.error_reply("ERR tollgate: mode must be 1 (take), 2 (check) or 3 (refund), got '" .. ARGV[4] .. "'")
end

local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000

local full_ms = math.ceil(capacity / rate * 1000)
if full_ms < 1 then
  full_ms = 1
elseif full_ms > MAX_TTL_MS then
  full_ms = MAX_TTL_MS
end

local key = KEYS[1]
local stored = redis.call("HMGET", key, "tokens", "ts")
local tokens = tonumber(stored[1])
local ts = tonumber(stored[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
else
  local elapsed = now - ts
  if elapsed < 0 then
    elapsed = 0
  elseif elapsed > full_ms then
    elapsed = full_ms
  end
  tokens = math.min(tokens + rate * elapsed / 1000, capacity)
  if now > ts then
    ts = now
  end
end

local allowed = 1
local retry_after = 0
if mode == 3 then
  tokens = math.min(tokens + cost, capacity)
elseif tokens >= cost then
  if mode == 1 then
    tokens = tokens - cost
  end
else
  allowed = 0
  retry_after = math.ceil((cost - tokens) / rate * 1000)
end

if mode ~= 2 then
  redis.call("HSET", key, "tokens", string.format("%.17g", tokens), "ts", string.format("%.17g", ts))
  redis.call("PEXPIRE", key, full_ms)
end

local reset_after = math.ceil((capacity - tokens) / rate * 1000)
return { allowed, string.format("%.17g", tokens), retry_after, reset_after }
