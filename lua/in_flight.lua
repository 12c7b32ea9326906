--[[
sluicegate in-flight limits (the README's "In-flight limits"), atomic in Redis: at most `max` leases
per key, each freed by its release or by its TTL. core/src/in_flight.rs is the same arithmetic.

  EVALSHA sha 1 key op id max ttl_ms [paired]

  key     a sorted set: member = lease id, score = its expiry in ms of server time
  op      1 acquire: take a slot under `id` if fewer than `max` are held (an id already held is
            refused: two requests may not share one slot)
          2 release: free the slot of `id` (nothing when it is not held: idempotent)
          3 renew: extend the lease of `id` to now + ttl_ms, if it is still held
  id      the lease id, 1 to 128 bytes
  max     1 to 2^32 - 1 (acquire; ignored otherwise)
  ttl_ms  1 to 86400000 (acquire and renew; ignored for release)
  paired  1: a release of `id` follows this acquire whatever its answer (Envoy's stream-done call);
          a refusal is then remembered for ttl_ms, and the next release of `id` frees nothing (it
          is the refused request's own; without this, a request naming a held id would free that
          slot while its holder still runs). 0 or absent: not paired.

Every call first drops the leases whose expiry has passed (a caller that crashed, a lost release).

Remembered refusals live in the same sorted set, as member "\1" .. id, with score
expiry + count * 2^42: above any lease's score (an expiry in ms, below 2^42 until 2109), so leases
are the scores below 2^42 and the count (at most 2047) and expiry fit a double exactly. Lease ids
never start with "\1" (sluicegate refuses ids with control bytes).

Returns {done, in_flight, retry_after_ms, expired}:
  done            1 when the acquire or renew holds the lease now, or the release freed it; else 0
  in_flight       leases held after the call
  retry_after_ms  a refused acquire: until the earliest lease expires (at the latest); else 0
  expired         leases this call dropped because they had expired without a release

The key is deleted with its last lease (released or found expired), and expires a minute after
its last lease would have (leases expired without a release found within that minute are counted),
so an abandoned key leaves nothing behind. Time comes from the
server (TIME): every replica sees one clock. Every argument is checked: anything else is an error,
never a default.
--]]

local GRACE_MS = 60000
local SLOT = 4398046511104 -- 2^42: refusal scores start here
local MAX_PENDING = 2047
local key = KEYS[1]
local op, id, max, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local paired = ARGV[5] == "1"

local function whole(v, lo, hi)
  return v ~= nil and v == math.floor(v) and v >= lo and v <= hi
end
if key == nil then return redis.error_reply("ERR sluicegate: one key expected") end
if op ~= 1 and op ~= 2 and op ~= 3 then
  return redis.error_reply("ERR sluicegate: op must be 1 acquire, 2 release or 3 renew, got '" .. tostring(ARGV[1]) .. "'")
end
if id == nil or #id < 1 or #id > 128 or string.byte(id, 1) == 1 then
  return redis.error_reply("ERR sluicegate: id must be 1 to 128 bytes, not starting with \\1")
end
if op == 1 and not whole(max, 1, 4294967295) then
  return redis.error_reply("ERR sluicegate: max must be a whole number from 1 to 4294967295, got '" .. tostring(ARGV[3]) .. "'")
end
if op ~= 2 and not whole(ttl, 1, 86400000) then
  return redis.error_reply("ERR sluicegate: ttl_ms must be a whole number from 1 to 86400000, got '" .. tostring(ARGV[4]) .. "'")
end

local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- Leases past their expiry (refusal scores are all above now).
local expired = redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
local refusal = "\1" .. id
local pending, refused_until = 0, 0
local score = redis.call("ZSCORE", key, refusal)
if score then
  score = tonumber(score)
  pending = math.floor(score / SLOT)
  refused_until = score - pending * SLOT
  if refused_until <= now then
    redis.call("ZREM", key, refusal)
    pending = 0
  end
end
local function count()
  return redis.call("ZCOUNT", key, "-inf", "(" .. SLOT)
end

local held = redis.call("ZSCORE", key, id)
local done = 0
if op == 1 then
  if not held and count() < max then
    redis.call("ZADD", key, now + ttl, id)
    done = 1
  end
elseif op == 2 and pending > 0 then
  -- A refused request's own release: it frees nothing.
  pending = pending - 1
  if pending == 0 then
    redis.call("ZREM", key, refusal)
  else
    redis.call("ZADD", key, refused_until + pending * SLOT, refusal)
  end
elseif held then
  if op == 2 then
    redis.call("ZREM", key, id)
  else
    redis.call("ZADD", key, "XX", now + ttl, id)
  end
  done = 1
end

if op == 1 and done == 0 and paired then
  -- Drop refusals whose release never came (past their expiry), then remember this one.
  local all = redis.call("ZRANGEBYSCORE", key, SLOT, "+inf", "WITHSCORES")
  for i = 1, #all, 2 do
    local s = tonumber(all[i + 1])
    if s - math.floor(s / SLOT) * SLOT <= now then redis.call("ZREM", key, all[i]) end
  end
  pending = math.min(pending + 1, MAX_PENDING)
  redis.call("ZADD", key, now + ttl + pending * SLOT, refusal)
  if redis.call("PTTL", key) < ttl + GRACE_MS then redis.call("PEXPIRE", key, ttl + GRACE_MS) end
end

local in_flight = count()
local retry = 0
if in_flight > 0 then
  if op == 1 and done == 0 then
    local first = redis.call("ZRANGE", key, 0, 0, "WITHSCORES")
    retry = math.max(0, math.ceil(tonumber(first[2]) - now))
  end
  if done == 1 and op ~= 2 then
    -- The key outlives its last lease by a minute, so that a call in that minute finds the
    -- leases that expired without a release and counts them (the leak indicator).
    local last = redis.call("ZREVRANGEBYSCORE", key, "(" .. SLOT, "-inf", "WITHSCORES", "LIMIT", 0, 1)
    local keep = math.max(1, math.ceil(tonumber(last[2]) - now)) + GRACE_MS
    if redis.call("PTTL", key) < keep then redis.call("PEXPIRE", key, keep) end
  end
end
return {done, in_flight, retry, expired}
