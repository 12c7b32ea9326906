--[[
tollgate token buckets (SPEC section 2), atomic in Redis. One call decides one bucket or many.

Calling it for one bucket:
  EVALSHA sha 1 key capacity rate cost mode

Several buckets (as tollgate batches them): N keys, then 4 arguments per bucket, then optionally the
groups, each all or nothing:
  EVALSHA sha N k1..kN  cap1 rate1 cost1 mode1 ... capN rateN costN modeN  [len1 len2 ...]

On Redis Cluster the keys of one node span several slots, which Redis refuses as declared KEYS
(CROSSSLOT), so tollgate sends them in ARGV instead: numkeys 0, ARGV[1] = N, ARGV[2..N+1] = the keys,
then the same arguments. Every key is read before anything is written: a key this node does not
serve fails the call before it changed anything, and tollgate retries on the right node.

Per bucket:
  capacity  bucket size (finite, > 0)
  rate      refill in tokens per second (finite, > 0)
  cost      tokens (finite, >= 0)
  mode      1 take: spend cost if there, a denial spends and writes nothing
            2 check: answer whether cost is there, write nothing (0: ok unless in debt)
            3 refund: give cost back, never above capacity
            4 force: charge cost whatever is left, down to -capacity (debt); allowed only if the
              tokens were there
            5, 6, 8: take, check, force whose denial does not veto its group (shadow-mode rules)

Groups: `len1 len2 ...` split the buckets, in order, into runs that must add up to N. Within a run,
if any vetoing request is denied, no take of the run is charged (refunds and forced charges still
land). Without them, every bucket is a group of its own. Requests on the same key see each other.

Returns a flat array, 4 entries per bucket, in order:
  allowed (1 or 0), tokens_remaining (a string, "%.17g", so no precision is lost; negative in debt),
  retry_after_ms (0 when allowed), reset_after_ms (time until full)
Both times are capped at 2^53 - 1: no input overflows an integer reply.

Storage: a string of two little-endian doubles (tokens, ts in ms of server time), written with PX =
the time until the bucket is full again, at least the full-refill time. A bucket with no key is full.
A key holding the hash of earlier versions (fields tokens, ts) is read as such and rewritten.

Hardening carried over from the origin project:
- time comes from the server (TIME), so every replica of tollgate sees one clock;
- a clock that steps back adds nothing; refill is capped at capacity;
- the key expires once the bucket would be full anyway;
- every argument must be a number in its range: anything else is a Redis error, never a default.

The arithmetic is written in the same order as src/core/bucket.rs so both give the same doubles.
--]]

local MAX_MS = 9007199254740991 -- 2^53 - 1, core::MAX_MS

local keys = KEYS
local base = 0
local n = #KEYS
if n == 0 then
  n = tonumber(ARGV[1])
  if n == nil or n < 1 or n ~= math.floor(n) then
    return redis.error_reply("ERR tollgate: with no KEYS, ARGV[1] must be the number of keys")
  end
  keys = {}
  for i = 1, n do
    keys[i] = ARGV[1 + i]
  end
  base = n + 1
end

local function fail(i, name, raw, expected)
  return redis.error_reply("ERR tollgate: bucket " .. i .. ": " .. name .. " must be " .. expected ..
    ", got '" .. tostring(raw) .. "'")
end

local function number(raw)
  local value = tonumber(raw)
  -- tonumber accepts "nan" and "inf" (strtod), so test them explicitly.
  if value == nil or value ~= value or value == math.huge or value == -math.huge then
    return nil
  end
  return value
end

local req = {}
for i = 1, n do
  local at = base + (i - 1) * 4
  local capacity, rate, cost, mode = number(ARGV[at + 1]), number(ARGV[at + 2]), number(ARGV[at + 3]), number(ARGV[at + 4])
  if capacity == nil or capacity <= 0 then return fail(i, "capacity", ARGV[at + 1], "a finite number > 0") end
  if rate == nil or rate <= 0 then return fail(i, "rate", ARGV[at + 2], "a finite number > 0") end
  if cost == nil or cost < 0 then return fail(i, "cost", ARGV[at + 3], "a finite number >= 0") end
  if mode ~= 1 and mode ~= 2 and mode ~= 3 and mode ~= 4 and mode ~= 5 and mode ~= 6 and mode ~= 8 then
    return fail(i, "mode", ARGV[at + 4], "1 take, 2 check, 3 refund, 4 force (+4: no veto)")
  end
  local veto = mode <= 4
  if mode > 4 then mode = mode - 4 end
  local full_ms = math.ceil(capacity / rate * 1000)
  if full_ms < 1 then full_ms = 1 elseif full_ms > MAX_MS then full_ms = MAX_MS end
  req[i] = { key = keys[i], capacity = capacity, rate = rate, cost = cost, mode = mode, veto = veto, full_ms = full_ms }
end

-- The groups: runs of consecutive buckets.
local groups = {}
local rest = base + 4 * n
if #ARGV > rest then
  local first, total = 1, 0
  for g = rest + 1, #ARGV do
    local len = tonumber(ARGV[g])
    if len == nil or len < 1 or len ~= math.floor(len) then
      return redis.error_reply("ERR tollgate: group lengths must be whole numbers >= 1, got '" .. tostring(ARGV[g]) .. "'")
    end
    groups[#groups + 1] = { first, first + len - 1 }
    first = first + len
    total = total + len
  end
  if total ~= n then
    return redis.error_reply("ERR tollgate: group lengths add up to " .. total .. ", not " .. n)
  end
else
  for i = 1, n do groups[i] = { i, i } end
end

-- Read every bucket before writing any.
local state = {}   -- key -> { tokens, ts } or false (absent: full)
for i = 1, n do
  local key = req[i].key
  if state[key] == nil then
    local ok, raw = pcall(redis.call, "GET", key)
    if not ok then
      if string.find(tostring(raw.err or raw), "WRONGTYPE", 1, true) then
        local h = redis.call("HMGET", key, "tokens", "ts")
        local tokens, ts = tonumber(h[1]), tonumber(h[2])
        raw = (tokens and ts) and { tokens, ts } or false
      else
        return redis.error_reply(tostring(raw.err or raw))
      end
    elseif raw then
      if #raw == 16 then
        local tokens, ts = struct.unpack("<dd", raw)
        raw = { tokens, ts }
      else
        return redis.error_reply("ERR tollgate: " .. key .. " holds a value tollgate did not write")
      end
    end
    state[key] = raw
  end
end

local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000

local function capped_ms(ms)
  if ms >= MAX_MS then return MAX_MS end
  ms = math.ceil(ms)
  if ms < 0 then return 0 end
  return ms
end

-- One request against a state (a table or false); returns the decision and the new state or nil.
local function apply(s, r, mode)
  local capacity, rate, cost = r.capacity, r.rate, r.cost
  local before, ts
  if not s then
    before, ts = capacity, now
  else
    local elapsed = now - s[2]
    local window = 2 * r.full_ms
    if elapsed < 0 then elapsed = 0 elseif elapsed > window then elapsed = window end
    before = math.min(math.max(s[1], -capacity) + rate * elapsed / 1000, capacity)
    ts = s[2]
    if now > ts then ts = now end
  end
  local allowed, tokens, write
  if mode == 1 then
    if before >= cost then allowed, tokens, write = true, before - cost, true
    else allowed, tokens, write = false, before, false end
  elseif mode == 2 then
    allowed, tokens, write = before >= cost, before, false
  elseif mode == 3 then
    allowed, tokens, write = true, math.min(before + cost, capacity), true
  else
    allowed, tokens, write = before >= cost, math.max(before - cost, -capacity), true
  end
  local retry = 0
  if not allowed then retry = capped_ms((cost - tokens) / rate * 1000) end
  local d = { allowed = allowed, tokens = tokens, retry = retry, reset = capped_ms((capacity - tokens) / rate * 1000) }
  if write then return d, { tokens, ts } end
  return d, nil
end

local out = {}
local dirty = {}   -- key -> the decision and request that describe its stored state
for _, g in ipairs(groups) do
  local saved = {}
  local decisions = {}
  local vetoed = false
  for i = g[1], g[2] do
    local r = req[i]
    if saved[r.key] == nil then saved[r.key] = { state[r.key], dirty[r.key] or false } end
    local d, w = apply(state[r.key], r, r.mode)
    if w then
      state[r.key] = w
      dirty[r.key] = { d, r }
    end
    if r.veto and not d.allowed then vetoed = true end
    decisions[i] = d
  end
  if vetoed and g[2] > g[1] then
    for key, s in pairs(saved) do
      state[key] = s[1]
      dirty[key] = s[2] or nil
    end
    for i = g[1], g[2] do
      local r = req[i]
      if r.mode == 3 or r.mode == 4 then
        local d, w = apply(state[r.key], r, r.mode)
        if w then
          state[r.key] = w
          dirty[r.key] = { d, r }
        end
        decisions[i] = d
      else
        local now_d = apply(state[r.key], r, 2)
        decisions[i] = { allowed = decisions[i].allowed, tokens = now_d.tokens, retry = decisions[i].retry, reset = now_d.reset }
      end
    end
  end
  for i = g[1], g[2] do
    local d = decisions[i]
    out[#out + 1] = d.allowed and 1 or 0
    out[#out + 1] = string.format("%.17g", d.tokens)
    out[#out + 1] = d.retry
    out[#out + 1] = d.reset
  end
end

for key, w in pairs(dirty) do
  local d, r = w[1], w[2]
  local s = state[key]
  local ttl = d.reset
  if ttl < r.full_ms then ttl = r.full_ms end
  redis.call("SET", key, struct.pack("<dd", s[1], s[2]), "PX", ttl)
end

return out
