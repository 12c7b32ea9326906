--[[
sluicegate token buckets (the README's "The token bucket"), atomic in Redis. One call decides one bucket or many.

Calling it for one bucket:
  EVALSHA sha 1 key capacity rate cost mode

Several buckets (as sluicegate batches them): N keys, then 4 arguments per bucket, then optionally the
groups, each all or nothing:
  EVALSHA sha N k1..kN  cap1 rate1 cost1 mode1 ... capN rateN costN modeN  [len1 len2 ...]

On Redis Cluster the keys of one node span several slots, which Redis refuses as declared KEYS
(CROSSSLOT), so sluicegate sends them in ARGV instead: numkeys 0, ARGV[1] = N, ARGV[2..N+1] = the keys,
then the same arguments. Every key is read before anything is written: a key this node does not
serve (a slot that moved or is moving) makes its group "away", decided nowhere here, and sluicegate
follows the slot for that group alone (MOVED, or ASK with ASKING while it migrates).

Per bucket:
  capacity  bucket size (finite, > 0)
  rate      refill in tokens per second (finite, > 0)
  cost      tokens (finite, >= 0)
  mode      1 take: spend cost if there, a denial spends and writes nothing
            2 check: answer whether cost is there, write nothing (0: ok unless in debt)
            3 refund: give cost back, never above capacity
            4 force: charge cost whatever is left, down to -capacity (debt); allowed only if the
              tokens were there
            10 take up to: spend as many of cost whole tokens as are there, at least 1 (a lease);
              denied, spending nothing, when not even one token is there
            5, 6, 8, 14: take, check, force, take up to whose denial does not veto its group
              (shadow-mode rules)
            9 settle a reservation (below)
            11 lease: take `cost` for a replica's lease only if the bucket still holds at least half
              its capacity after it; always allowed, never vetoes (leases, below)
            12 return a lease: give back `cost` unspent tokens of the lease named in the `L` section

Then, optionally, reservations: the literal `R`, then triples `index key ttl_ms`: bucket `index` (1-based)
has a reservation key. For a take (mode 1 or 10) that is charged, the key is written ("r", what was taken,
the bucket's key) with PX ttl_ms, so that a settle can later give back at most that, once. For a
settle (mode 9) the key is the reservation to settle; `cost` is then the real cost.

Settle (mode 9): reads the reservation. Missing, or made for another bucket: nothing changes and the
answer's allowed is 2 (not found). Not settled yet: what the work cost below what was taken is
refunded, above it charged as a forced charge (debt), and the reservation is marked settled with the
answer (KEEPTTL). Settled already: the same answer again, nothing changes. Settles are alone in
their group.

Leases (QUOTA_LEASES; the README's "Leased quota"): optionally, last, the literal `L`, the lease
lifetime in ms, then triples `index size generation` for the returns (mode 12) of the call. A granted
lease (mode 11) counts its size as leased out of the bucket until every lease of its generation has
expired: the bucket refills and takes refunds only up to capacity minus what is leased, so that the
bucket plus the unspent leases never hold more than capacity and everything spent from a lease obeys
the bucket's bound over any window. A generation starts (named by the server time in ms) with the
first lease while none is out and ends twice the lease lifetime after its latest lease (a replica
spends a lease for one lifetime and gives it back within the next); a return of a lease of
the current generation takes its size off what is leased out and puts its unspent tokens back; a
return of an ended generation changes nothing: since it ended the bucket had room for those tokens
and refilled it, so they are lost rather than added twice. A lease's answer carries the generation
in place of reset_after_ms.

Groups: `len1 len2 ...` split the buckets, in order, into runs that must add up to N. Within a run,
if any vetoing request is denied, no take of the run is charged (refunds and forced charges still
land). Without them, every bucket is a group of its own. Requests on the same key see each other.

Returns a flat array, 4 entries per bucket, in order:
  allowed (1 or 0; 2: a settle's reservation was not found; 4: away, this node does not serve the
    key, its slot moved or is moving: nothing of its group was decided or written),
  tokens_remaining (a string, "%.17g", so no precision is lost; negative in debt),
  when allowed, the tokens taken (a charged take's cost, what a take up to could give; 0 for a
    check, refund, forced charge or settle, and for a take its group vetoed), otherwise
    retry_after_ms (until cost is there; one token for a take up to),
  reset_after_ms (time until full)
Both times are capped at 2^53 - 1: no input overflows an integer reply.

Refunds (mode 3, and settles that give back) publish the bucket's key on the channel
`sluicegate:refunds`: every replica's local deny cache forgets what it knew of that bucket.

Storage: a string of two little-endian doubles (tokens, ts in ms of server time), written with PX =
the time until the bucket is full again, at least the full-refill time; five while leases are out
(tokens, ts, leased, generation, until), living at least until the last lease expires. A bucket with no key is full.
A key holding the hash of earlier versions (fields tokens, ts) is read as such and rewritten.

Hardening carried over from the origin project:
- time comes from the server (TIME), so every replica of sluicegate sees one clock;
- a clock that steps back adds nothing; refill is capped at capacity;
- the key expires once the bucket would be full anyway;
- every argument must be a number in its range: anything else is a Redis error, never a default.

The arithmetic is written in the same order as src/core/bucket.rs so both give the same doubles.
--]]

local MAX_MS = 9007199254740991 -- 2^53 - 1, core::MAX_MS

-- Written for speed as well as clarity: one call may decide 128 buckets, so no table is made per
-- request or per decision (parallel arrays, multiple return values).

local keys = KEYS
local base = 0
local n = #KEYS
if n == 0 then
  n = tonumber(ARGV[1])
  if n == nil or n < 1 or n ~= math.floor(n) then
    return redis.error_reply("ERR sluicegate: with no KEYS, ARGV[1] must be the number of keys")
  end
  keys = {}
  for i = 1, n do
    keys[i] = ARGV[1 + i]
  end
  base = n + 1
end

local function fail(i, name, raw, expected)
  return redis.error_reply("ERR sluicegate: bucket " .. i .. ": " .. name .. " must be " .. expected ..
    ", got '" .. tostring(raw) .. "'")
end

local huge = math.huge
local function number(raw)
  local value = tonumber(raw)
  -- tonumber accepts "nan" and "inf" (strtod), so test them explicitly.
  if value == nil or value ~= value or value == huge or value == -huge then
    return nil
  end
  return value
end

-- The requests, as parallel arrays.
local caps, rates, costs, modes, vetoes, fulls = {}, {}, {}, {}, {}, {}
local settles = {}
local ceil = math.ceil
for i = 1, n do
  local at = base + (i - 1) * 4
  local capacity, rate, cost, mode = number(ARGV[at + 1]), number(ARGV[at + 2]), number(ARGV[at + 3]), number(ARGV[at + 4])
  if capacity == nil or capacity <= 0 then return fail(i, "capacity", ARGV[at + 1], "a finite number > 0") end
  if rate == nil or rate <= 0 then return fail(i, "rate", ARGV[at + 2], "a finite number > 0") end
  if cost == nil or cost < 0 then return fail(i, "cost", ARGV[at + 3], "a finite number >= 0") end
  if mode ~= 1 and mode ~= 2 and mode ~= 3 and mode ~= 4 and mode ~= 5 and mode ~= 6 and mode ~= 8
    and mode ~= 9 and mode ~= 10 and mode ~= 11 and mode ~= 12 and mode ~= 14 then
    return fail(i, "mode", ARGV[at + 4], "1 take, 2 check, 3 refund, 4 force, 10 take up to (+4: no veto), 9 settle, 11 lease, 12 return")
  end
  if mode == 9 then
    -- The operation is known once the reservation is read.
    settles[i], vetoes[i], mode = true, true, 2
  elseif mode == 11 or mode == 12 then
    vetoes[i] = false
  else
    vetoes[i] = mode <= 4 or mode == 10
    if mode > 4 and mode ~= 10 then mode = mode - 4 end
  end
  local full_ms = ceil(capacity / rate * 1000)
  if full_ms < 1 then full_ms = 1 elseif full_ms > MAX_MS then full_ms = MAX_MS end
  caps[i], rates[i], costs[i], modes[i], fulls[i] = capacity, rate, cost, mode, full_ms
end

-- The groups: runs of consecutive buckets, as their last index; then the reservations.
local ends = {}
local at = base + 4 * n + 1
local total = 0
while at <= #ARGV and ARGV[at] ~= "R" and ARGV[at] ~= "L" do
  local len = tonumber(ARGV[at])
  if len == nil or len < 1 or len ~= math.floor(len) then
    return redis.error_reply("ERR sluicegate: group lengths must be whole numbers >= 1, got '" .. tostring(ARGV[at]) .. "'")
  end
  total = total + len
  ends[#ends + 1] = total
  at = at + 1
end
if #ends > 0 then
  if total ~= n then
    return redis.error_reply("ERR sluicegate: group lengths add up to " .. total .. ", not " .. n)
  end
else
  for i = 1, n do ends[i] = i end
end
local rkeys, rttls = {}, {}
if at <= #ARGV and ARGV[at] == "R" then
  at = at + 1
  while at + 2 <= #ARGV and ARGV[at] ~= "L" do
    local i, ttl = tonumber(ARGV[at]), tonumber(ARGV[at + 2])
    if i == nil or i < 1 or i > n or i ~= math.floor(i) then
      return redis.error_reply("ERR sluicegate: reservation for bucket '" .. tostring(ARGV[at]) .. "' of " .. n)
    end
    if ttl == nil or ttl < 0 or ttl ~= math.floor(ttl) then
      return redis.error_reply("ERR sluicegate: reservation ttl must be a whole number of ms, got '" .. tostring(ARGV[at + 2]) .. "'")
    end
    rkeys[i], rttls[i] = ARGV[at + 1], ttl
    at = at + 3
  end
  if at <= #ARGV and ARGV[at] ~= "L" then
    return redis.error_reply("ERR sluicegate: reservations come in triples: index key ttl_ms")
  end
end
local lease_ms, rsizes, rgens = nil, {}, {}
if at <= #ARGV then
  lease_ms = tonumber(ARGV[at + 1])
  if ARGV[at] ~= "L" or lease_ms == nil or lease_ms < 1 or lease_ms ~= math.floor(lease_ms) then
    return redis.error_reply("ERR sluicegate: expected L and the lease lifetime in whole ms, got '" .. tostring(ARGV[at + 1]) .. "'")
  end
  at = at + 2
  while at + 2 <= #ARGV do
    local i, size, gen = tonumber(ARGV[at]), number(ARGV[at + 1]), number(ARGV[at + 2])
    if i == nil or i < 1 or i > n or i ~= math.floor(i) or modes[i] ~= 12 then
      return redis.error_reply("ERR sluicegate: lease return for bucket '" .. tostring(ARGV[at]) .. "', not a return of " .. n)
    end
    if size == nil or size < 0 or gen == nil then
      return redis.error_reply("ERR sluicegate: a lease return needs its size and generation, got '" .. tostring(ARGV[at + 1]) .. "'")
    end
    rsizes[i], rgens[i] = size, gen
    at = at + 3
  end
  if at ~= #ARGV + 1 then
    return redis.error_reply("ERR sluicegate: lease returns come in triples: index size generation")
  end
end
for i = 1, n do
  if modes[i] == 12 and rsizes[i] == nil then return fail(i, "lease return", "", "named in the L section") end
  if modes[i] == 11 and lease_ms == nil then return fail(i, "lease", "", "given a lifetime in the L section") end
end
for i in pairs(settles) do
  if rkeys[i] == nil then return fail(i, "reservation", "", "given for a settle") end
end

-- A key this node does not serve (its slot moved, or is moving and the key has gone): the bucket is
-- answered "away" (allowed = 4) with the rest of its group, nothing written, and sluicegate follows
-- the slot for it; the call's other buckets are decided as usual.
local find, sub = string.find, string.sub
local function not_here(err)
  return find(err, "non local key", 1, true) or find(err, "MOVED", 1, true)
    or find(err, "ASK", 1, true) or find(err, "TRYAGAIN", 1, true)
end
local away_key = {}

-- Read every bucket before writing any. tok[key] == false: absent (full). lsd, gns, unt: what is
-- leased out, its generation and when its last lease expires (0 when none).
local tok, tss = {}, {}
local lsd, gns, unt = {}, {}, {}
local unpack = struct.unpack
for i = 1, n do
  local key = keys[i]
  if tok[key] == nil then
    local raw = redis.pcall("GET", key)
    if type(raw) == "table" and raw.err then
      if string.find(raw.err, "WRONGTYPE", 1, true) then
        local h = redis.call("HMGET", key, "tokens", "ts")
        local t, ts = tonumber(h[1]), tonumber(h[2])
        if t and ts then tok[key], tss[key] = t, ts else tok[key] = false end
      elseif not_here(raw.err) then
        away_key[key], tok[key] = true, false
      else
        return redis.error_reply(raw.err)
      end
    elseif raw then
      if #raw == 16 then
        tok[key], tss[key] = unpack("<dd", raw)
      elseif #raw == 40 then
        tok[key], tss[key], lsd[key], gns[key], unt[key] = unpack("<ddddd", raw)
      else
        return redis.error_reply("ERR sluicegate: " .. key .. " holds a value sluicegate did not write")
      end
    else
      tok[key] = false
    end
    if lsd[key] == nil then lsd[key], gns[key], unt[key] = 0, 0, 0 end
  end
end

-- The reservations to settle, read before any write too. done[i]: answered without the bucket
-- arithmetic (settled before, or not found).
local done, settle_now = {}, {}
for i in pairs(settles) do
  local raw = nil
  if not away_key[keys[i]] then
    raw = redis.pcall("GET", rkeys[i])
    if type(raw) == "table" and raw.err then
      if not not_here(raw.err) then return redis.error_reply(raw.err) end
      away_key[keys[i]], raw = true, nil
    end
  end
  -- "r\n<reserved>\n<bucket key>" or "s\n<tokens>\n<reset_ms>\n<bucket key>"
  local kind = raw and sub(raw, 1, 2)
  if kind == "r\n" then
    local e1 = find(raw, "\n", 3, true)
    local reserved = e1 and tonumber(sub(raw, 3, e1 - 1))
    if reserved and sub(raw, e1 + 1) == keys[i] then
      local actual = costs[i]
      if actual < reserved then modes[i], costs[i] = 3, reserved - actual
      elseif actual > reserved then modes[i], costs[i] = 4, actual - reserved
      else modes[i], costs[i] = 2, 0 end
      settle_now[i] = true
    else
      done[i] = {2, 0, 0}
    end
  elseif kind == "s\n" then
    local e1 = find(raw, "\n", 3, true)
    local e2 = e1 and find(raw, "\n", e1 + 1, true)
    if e2 and sub(raw, e2 + 1) == keys[i] then
      done[i] = {1, tonumber(sub(raw, 3, e1 - 1)), tonumber(sub(raw, e1 + 1, e2 - 1))}
    else
      done[i] = {2, 0, 0}
    end
  else
    done[i] = {2, 0, 0}
  end
end

-- A group with a bucket away is away whole: it can only be decided where all of it lives.
local away = {}
do
  local first = 1
  for _, last in ipairs(ends) do
    local gone = false
    for i = first, last do
      if away_key[keys[i]] then gone = true end
    end
    if gone then
      for i = first, last do away[i] = true end
    end
    first = last + 1
  end
end

local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000

-- Every lease of a generation whose last lease has expired is spent or lost: nothing is leased out.
for key, l in pairs(lsd) do
  if l > 0 and now >= unt[key] then lsd[key] = 0 end
end

local function capped_ms(ms)
  if ms >= MAX_MS then return MAX_MS end
  ms = ceil(ms)
  if ms < 0 then return 0 end
  return ms
end

-- Request i with operation `mode` against the bucket's state, with `leased` tokens leased out.
-- Returns allowed, tokens after, retry_after, reset_after, whether to write (the new `ts` is then
-- `now` or later), and the tokens taken.
local function apply(i, t, ts, mode, leased)
  local capacity, rate, cost = caps[i], rates[i], costs[i]
  -- Tokens leased out are the bucket's too: it refills only up to the rest.
  local room = capacity - leased
  local before
  if t == false then
    before, ts = capacity, now
  else
    local elapsed = now - ts
    local window = 2 * fulls[i]
    if elapsed < 0 then elapsed = 0 elseif elapsed > window then elapsed = window end
    if t < -capacity then t = -capacity end
    before = t + rate * elapsed / 1000
    if before > room then before = room end
    if now > ts then ts = now end
  end
  local allowed, tokens, write
  local granted, need = 0, cost
  if mode == 1 then
    if before >= cost then allowed, tokens, write, granted = true, before - cost, true, cost
    else allowed, tokens, write = false, before, false end
  elseif mode == 10 then
    need = 1
    if before >= 1 then
      granted = cost
      if granted < 1 then granted = 1 end
      local whole = math.floor(before)
      if granted > whole then granted = whole end
      allowed, tokens, write = true, before - granted, true
    else allowed, tokens, write = false, before, false end
  elseif mode == 11 then
    allowed, tokens, write = true, before, false
    if cost >= 1 and before - cost >= capacity / 2 then
      tokens, write, granted = before - cost, true, cost
    end
  elseif mode == 2 then
    allowed, tokens, write = before >= cost, before, false
  elseif mode == 3 then
    tokens = before + cost
    if tokens > room then tokens = room end
    allowed, write = true, true
  else
    allowed, tokens, write = before >= cost, before - cost, true
    if tokens < -capacity then tokens = -capacity end
  end
  local retry = 0
  if not allowed then retry = capped_ms((need - tokens) / rate * 1000) end
  return allowed, tokens, retry, capped_ms((capacity - tokens) / rate * 1000), write, ts, granted
end

-- Decide group by group. ttl[key]: the TTL of the state to write (nil: nothing to write).
local out = {}
local ttl = {}
local charged = {}
local refunded = {}

-- Applies request i with `mode` to its key's state in place. Returns allowed, tokens after,
-- retry_after, reset_after and the tokens taken.
local function step(i, mode)
  local key = keys[i]
  local leased = lsd[key]
  if mode == 12 then
    -- A lease comes back: off what is leased out, and its unspent tokens into the room that
    -- makes, if its generation is still counted. Once the generation has ended, the bucket has
    -- had room for them and the refill to fill it: they are lost, never added twice.
    local _, before, _, _, _, ts = apply(i, tok[key], tss[key], 2, leased)
    local tokens = before
    if leased > 0 and gns[key] == rgens[i] then
      leased = leased - rsizes[i]
      if leased < 0 then leased = 0 end
      lsd[key] = leased
      tokens = before + costs[i]
      if tokens > caps[i] - leased then tokens = caps[i] - leased end
    end
    local reset = capped_ms((caps[i] - tokens) / rates[i] * 1000)
    tok[key], tss[key] = tokens, ts
    ttl[key] = reset > fulls[i] and reset or fulls[i]
    if costs[i] > 0 then refunded[key] = true end
    return true, tokens, 0, reset, 0
  end
  local allowed, tokens, retry, reset, write, ts, granted = apply(i, tok[key], tss[key], mode, leased)
  if write then
    tok[key], tss[key] = tokens, ts
    ttl[key] = reset > fulls[i] and reset or fulls[i]
    if mode == 11 then
      -- A new generation's name is later than any before it, so no late return can match it.
      if leased == 0 then
        local gen = math.floor(now)
        if gen <= gns[key] then gen = gns[key] + 1 end
        gns[key] = gen
      end
      lsd[key] = leased + granted
      -- Counted for twice its lifetime: the replica spends it for one and gives it back within
      -- the other, so its return comes while its generation is still counted.
      local until_ms = now + 2 * lease_ms
      if until_ms > unt[key] then unt[key] = until_ms end
    end
  end
  if mode == 3 then refunded[key] = true end
  return allowed, tokens, retry, reset, granted
end
local first = 1
for _, last in ipairs(ends) do
  local vetoed = false
  local saved_t, saved_ts, saved_ttl, saved_l
  if last > first then
    saved_t, saved_ts, saved_ttl, saved_l = {}, {}, {}, {}
  end
  for i = first, last do
    local key = keys[i]
    if saved_t and saved_t[key] == nil then
      saved_t[key], saved_ts[key], saved_ttl[key] = tok[key], tss[key], ttl[key] or false
      saved_l[key] = {lsd[key], gns[key], unt[key]}
    end
    local o = 4 * (i - 1)
    if away[i] then
      out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 4, 0, 0, 0
    elseif done[i] then
      out[o + 1], out[o + 2], out[o + 3], out[o + 4] = done[i][1], done[i][2], 0, done[i][3]
    else
      local allowed, tokens, retry, reset, granted = step(i, modes[i])
      if vetoes[i] and not allowed then vetoed = true end
      if granted > 0 and modes[i] ~= 11 then charged[i] = granted end
      -- An allowed answer's third value is what it took; a denial's, its wait. A lease's fourth is
      -- its generation.
      if modes[i] == 11 then reset = granted > 0 and gns[key] or 0 end
      out[o + 1], out[o + 2], out[o + 3], out[o + 4] = allowed and 1 or 0, tokens, allowed and granted or retry, reset
    end
  end
  if vetoed and saved_t then
    -- No take of the group is charged: back to the states before it, then only the refunds and
    -- forced charges (which always land) again. Each answer keeps its own verdict.
    for key, t in pairs(saved_t) do
      tok[key], tss[key] = t, saved_ts[key]
      ttl[key] = saved_ttl[key] or nil
      lsd[key], gns[key], unt[key] = saved_l[key][1], saved_l[key][2], saved_l[key][3]
    end
    for i = first, last do
      local key, mode = keys[i], modes[i]
      local o = 4 * (i - 1)
      charged[i] = nil
      if mode == 3 or mode == 4 or mode == 12 then
        local allowed, tokens, retry, reset = step(i, mode)
        out[o + 1], out[o + 2], out[o + 3], out[o + 4] = allowed and 1 or 0, tokens, allowed and 0 or retry, reset
      else
        -- Not charged, and no lease taken.
        local _, tokens, _, reset = apply(i, tok[key], tss[key], 2, lsd[key])
        out[o + 2], out[o + 4] = tokens, reset
        -- Not charged: an allowed answer took nothing.
        if out[o + 1] == 1 then out[o + 3] = 0 end
      end
    end
  end
  first = last + 1
end

-- Tokens as "%.17g" strings: a number would reach the caller truncated to an integer.
local format = string.format
for i = 2, 4 * n, 4 do
  out[i] = format("%.17g", out[i])
end

local pack = struct.pack
for key, t in pairs(ttl) do
  if lsd[key] > 0 then
    -- What is leased out must outlive its leases: a bucket that expired would read as full.
    local left = ceil(unt[key] - now)
    if left > t then t = left end
    redis.call("SET", key, pack("<ddddd", tok[key], tss[key], lsd[key], gns[key], unt[key]), "PX", t)
  else
    redis.call("SET", key, pack("<dd", tok[key], tss[key]), "PX", t)
  end
end

-- Refunds filled these buckets: every replica's deny cache must forget what it knew of them.
for key in pairs(refunded) do
  redis.call("PUBLISH", "sluicegate:refunds", key)
end

-- Reservations: settled ones keep their answer (and their TTL); charged takes record theirs.
for i, rkey in pairs(rkeys) do
  if settle_now[i] then
    local o = 4 * (i - 1)
    redis.call("SET", rkey, "s\n" .. out[o + 2] .. "\n" .. out[o + 4] .. "\n" .. keys[i], "KEEPTTL")
  elseif charged[i] and not settles[i] and rttls[i] > 0 then
    redis.call("SET", rkey, "r\n" .. format("%.17g", charged[i]) .. "\n" .. keys[i], "PX", rttls[i])
  end
end

return out
