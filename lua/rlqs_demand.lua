--[[
sluicegate RLQS demand exchange (the README's "Envoy without a call per request (RLQS)"): each
replica publishes, per quota bucket, the demand of the Envoys streaming to it, and reads the sum over
every replica, in one call per replica per interval.

  EVALSHA sha N key1 .. keyN replica ttl_ms demand1 participants1 .. demandN participantsN

  key           a hash per quota bucket: field = replica id, value = "demand participants expiry_ms"
                (all keys of a call share a hash tag: one slot, one node)
  replica       this replica's id (random per process start)
  ttl_ms        how long this replica's figures count without being published again, 1 to 3600000
  demand        requests per second on this replica, a finite number >= 0
  participants  this replica's Envoy buckets in it; 0 withdraws this replica's figures

Returns, per key, {demand, participants} summed over the fields not yet expired (demand as a
string: a Lua number would be truncated to an integer). Expired fields are deleted on the way; a
key lives ttl_ms past its last publication. Time comes from the server (TIME): every replica
sees one clock. Every argument is checked: anything else is an error, never a default.
--]]

local replica = ARGV[1]
local ttl = tonumber(ARGV[2])
if replica == nil or replica == '' then
  return redis.error_reply('replica must be a non-empty id')
end
if ttl == nil or ttl < 1 or ttl > 3600000 or ttl ~= math.floor(ttl) then
  return redis.error_reply('ttl_ms must be an integer from 1 to 3600000')
end
if #ARGV ~= 2 + 2 * #KEYS then
  return redis.error_reply('expected a demand and a participant count per key')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local out = {}
for i, key in ipairs(KEYS) do
  local demand = tonumber(ARGV[1 + 2 * i])
  local participants = tonumber(ARGV[2 + 2 * i])
  if demand == nil or demand ~= demand or demand < 0 or demand == math.huge then
    return redis.error_reply('demand must be a finite number >= 0')
  end
  if participants == nil or participants < 0 or participants ~= math.floor(participants)
      or participants > 4294967295 then
    return redis.error_reply('participants must be an integer >= 0')
  end
  if participants > 0 then
    redis.call('HSET', key, replica,
      string.format('%.17g %d %d', demand, participants, now + ttl))
  else
    redis.call('HDEL', key, replica)
  end
  local fields = redis.call('HGETALL', key)
  local sum, count = 0, 0
  for j = 1, #fields, 2 do
    local d, n, expiry = string.match(fields[j + 1], '^(%S+) (%d+) (%d+)$')
    d, n, expiry = tonumber(d), tonumber(n), tonumber(expiry)
    if d == nil or n == nil or expiry == nil or expiry <= now then
      redis.call('HDEL', key, fields[j])
    else
      sum = sum + d
      count = count + n
    end
  end
  if count > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
  out[i] = {string.format('%.17g', sum), count}
end
return out
