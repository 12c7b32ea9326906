--[[
sluicegate in-flight limits (the README's "In-flight limits"), atomic in Redis: at most `max` leases
per key, each freed by its release or by its TTL. core/src/in_flight.rs is the same arithmetic.

  EVALSHA sha 1 key op id max ttl_ms

  key     a sorted set: member = lease id, score = its expiry in ms of server time
  op      1 acquire: take a slot under `id` if fewer than `max` are held (an id already held is
            refused: two requests may not share one slot)
          2 release: free the slot of `id` (nothing when it is not held: idempotent)
          3 renew: extend the lease of `id` to now + ttl_ms, if it is still held
  id      the lease id, 1 to 128 bytes
  max     1 to 2^32 - 1 (acquire; ignored otherwise)
  ttl_ms  1 to 86400000 (acquire and renew; ignored for release)

Every call first drops the leases whose expiry has passed (a caller that crashed, a lost release).

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
local key = KEYS[1]
local op, id, max, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local function whole(v, lo, hi)
  return v ~= nil and v == math.floor(v) and v >= lo and v <= hi
end
if key == nil then return redis.error_reply("ERR sluicegate: one key expected") end
if op ~= 1 and op ~= 2 and op ~= 3 then
  return redis.error_reply("ERR sluicegate: op must be 1 acquire, 2 release or 3 renew, got '" .. tostring(ARGV[1]) .. "'")
end
if id == nil or #id < 1 or #id > 128 then
  return redis.error_reply("ERR sluicegate: id must be 1 to 128 bytes")
end
if op == 1 and not whole(max, 1, 4294967295) then
  return redis.error_reply("ERR sluicegate: max must be a whole number from 1 to 4294967295, got '" .. tostring(ARGV[3]) .. "'")
end
if op ~= 2 and not whole(ttl, 1, 86400000) then
  return redis.error_reply("ERR sluicegate: ttl_ms must be a whole number from 1 to 86400000, got '" .. tostring(ARGV[4]) .. "'")
end

local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local expired = redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
local held = redis.call("ZSCORE", key, id)
local done = 0
if op == 1 then
  if not held and redis.call("ZCARD", key) < max then
    redis.call("ZADD", key, now + ttl, id)
    done = 1
  end
elseif held then
  if op == 2 then
    redis.call("ZREM", key, id)
  else
    redis.call("ZADD", key, "XX", now + ttl, id)
  end
  done = 1
end

local in_flight = redis.call("ZCARD", key)
local retry = 0
if in_flight > 0 then
  if op == 1 and done == 0 then
    local first = redis.call("ZRANGE", key, 0, 0, "WITHSCORES")
    retry = math.max(0, math.ceil(tonumber(first[2]) - now))
  end
  if done == 1 and op ~= 2 then
    -- The key outlives its last lease by a minute, so that a call in that minute finds the
    -- leases that expired without a release and counts them (the leak indicator).
    local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
    redis.call("PEXPIRE", key, math.max(1, math.ceil(tonumber(last[2]) - now)) + GRACE_MS)
  end
end
return {done, in_flight, retry, expired}
