-- admit_job.lua: decide admit / defer / reject for one request, atomically.
--
-- KEYS = [state, exp, waiters, samples, buckets]
-- ARGV = [prefix, clock_ms, class, vram, waiter_id, owner, device, tenant,
--         n_samples, sent_ms, (uuid, total, used, age_ms) * n_samples]
--   sent_ms: a lower bound of this script clock when the gate took the ages
--   (from the clock in earlier replies; 0 with an injected clock_ms). A
--   sample's time is sent_ms - age_ms, never now - age_ms: a call that waited
--   (Redis busy with another script, the gate's thread descheduled) would make
--   an old sample pass for a newer one, which could end a ghost released after
--   it was taken, or take an actual measured after it off its used memory.
-- -> {outcome, reason, retry_ms, device_uuid, lease_id, expires_ms, detail,
--     available, policy_version, now, epoch[, deadline]}: available is the bytes free for this
--     request on its best device (the chosen one, or the closest to fitting),
--     -1 when not reached; policy_version is the pool's (a gate that sees it
--     change reads the policy again); now is the script clock (ms); epoch is
--     the pool's (publish_policy.lua; "" for a pool made before epochs): an
--     admitted lease's, sent back with its renewals; deadline (an ADMIT of a
--     lease only) its max-duration deadline, 0 for none
--    outcome "admit" | "defer" | "reject". Error replies: "nopolicy" (the
--    pool has no policy yet), "unknown_class <name>".
--
-- Key schema (P = ARGV[1] = "gpugate:{<pool>}:"; record formats in the
-- prelude):
--   P state      hash  clock (last script time, ms), pool, classes,
--                      c:<class> (class record), pause:<class> ("until_ms"),
--                      cap:<class> ("n until_ms"; until 0 = no expiry),
--                      n:<class> (live leases), d:<class>:<uuid> and
--                      d::<uuid> (live leases per device), seq (the last lease id),
--                      next_exp (a lower bound of the earliest lease expiry),
--                      m:<uuid> (memory sums of the device's leases;
--                      idle includes idle workers' excess), swept (when a
--                      heartbeat last removed stale samples), epoch and
--                      recover (publish_policy.lua)
--   P exp        zset  "<uuid>\t<id>" -> expiry ms, live leases only
--   P waiters    hash  waiter id -> waiter record
--   P samples    hash  uuid -> sample record (the freshest one seen; the
--                      heartbeats remove those 10 TTLs old: renew_leases.lua)
--   P buckets    hash  class -> "tokens updated_ms"
--   P dev:<uuid> hash  lease id -> lease record (live leases and ghosts)
--   P dec:<minute> hash "<class> <outcome> <reason>" -> answers in that
--                      minute (minute = ms // 60000), expiring after 16 min
--   P ghosts     zset  "<uuid>\t<id>" -> release ms, ghosts not yet ended
--
-- Order: reap expired leases (at most 64 per call, see reap_expired; with
-- expired leases left, every estimated retry below is 20 ms); a recovery
-- window (publish_policy.lua); pause; GPU
-- presence (a device the caller listed but without a fresh sample: DEFER
-- stale_sample; none listed: the class's no_gpu); never fits (REJECT, judged
-- on the capacity of every listed device: when only stale ones could hold it,
-- DEFER stale_sample); class cap; per-device caps; higher-priority waiters;
-- VRAM, fragmentation (the class's max_fragmentation) and placement; token
-- bucket; lease. Every DEFER refreshes the request's waiter entry.

local state_key = KEYS[1]
local exp_key = KEYS[2]
local waiters_key = KEYS[3]
local samples_key = KEYS[4]
local buckets_key = KEYS[5]

local prefix = ARGV[1]
local clock_ms = tonumber(ARGV[2])
local cls = ARGV[3]
local vram = tonumber(ARGV[4])
local waiter_id = ARGV[5]
local owner = ARGV[6]
local want_device = ARGV[7]
local tenant = ARGV[8]
local n_samples = tonumber(ARGV[9])
local sent_ms = tonumber(ARGV[10])

local now
local version
local epoch
local admitted_deadline  -- an ADMIT's lease's max-duration deadline (0: none)
-- Deletions (an expired waiter, an ended ghost) wait for the end of the
-- script: past maxmemory Redis refuses a script's writes only until its first
-- one, and these free memory, so one of them first would let a lease be
-- written that could never be renewed. {command, key, field} each.
local frees = {}

local function decide()
local st = redis.call('HMGET', state_key, 'clock', 'pool', 'c:' .. cls, 'pause:' .. cls, 'cap:' .. cls, 'n:' .. cls,
                     'seq', 'next_exp', 'pversion', 'recover', 'epoch')
now = script_now(clock_ms, tonumber(st[1]) or 0)
version = st[9] or ''
epoch = st[11] or ''
if not st[2] then return redis.error_reply('nopolicy') end
if not st[3] then return redis.error_reply('unknown_class ' .. cls) end

local margin, ttl, placement, max_age, waiter_ttl, aging, retry_max, shared_cap = pool_fields(st[2])
margin, ttl, max_age, waiter_ttl = tonumber(margin), tonumber(ttl), tonumber(max_age), tonumber(waiter_ttl)
aging, retry_max, shared_cap = tonumber(aging), tonumber(retry_max), tonumber(shared_cap)
local my_prio, cap, dev_cap, rate, burst, reserve_above, max_ms, _, no_gpu, max_frag =
  class_fields(st[3])
max_frag = tonumber(max_frag)
my_prio, cap, dev_cap, rate = tonumber(my_prio), tonumber(cap), tonumber(dev_cap), tonumber(rate)
burst, reserve_above, max_ms = tonumber(burst), tonumber(reserve_above), tonumber(max_ms)
-- Whether a device of this capacity could ever hold the request (never
-- judged on current use).
local function could_hold(total) return total - margin - reserve_above >= vram end

-- A DEFER or REJECT writes no state but its waiter, so only scripts that
-- change leases, buckets or overrides record the clock.
local reaped, next_exp = reap_expired(prefix, state_key, exp_key, now, tonumber(st[8]))
if reaped > 0 then
  redis.call('HSET', state_key, 'clock', now)
  st[6] = redis.call('HGET', state_key, 'n:' .. cls)
end

-- An estimated retry: a third of a lease TTL, or half the waiter TTL when
-- shorter (a poller that comes back when told stays a waiter, even with the
-- client's jitter of up to +50 %), at least 100 ms, capped by retry_max.
local estimate = math.min(retry_max, math.max(100, math.floor(math.min(ttl / 3, waiter_ttl / 2))))
-- Reaping stopped at its bound with expired leases left (the bound after the
-- call is still <= now): they count against caps and memory as if live, so a
-- DEFER here may be owed to them alone. It says come back in 20 ms instead:
-- the next decision reaps the next batch, and a worker killed with hundreds
-- of leases is gone after a few such retries, not after one estimate each.
if next_exp <= now then estimate = math.min(estimate, 20) end

-- This request's waiter entry: read once, refreshed by every DEFER.
local since = nil
local function my_since()
  if since == nil then
    since = now
    local raw = redis.call('HGET', waiters_key, waiter_id)
    if raw then
      -- An entry past its TTL is a request that went away: it starts afresh.
      local _, s, _, _, x = waiter_fields(raw)
      if tonumber(x) > now then since = tonumber(s) end
    end
  end
  return since
end

local function defer(reason, retry, device, wants, detail)
  local rec = string.format('%d %d %d %s %d %s %s %s %d %s', my_prio, my_since(), vram, wants,
                            now + waiter_ttl, device ~= '' and device or '-', cls, reason, reserve_above,
                            want_device ~= '' and 'pinned' or '-')
  redis.call('HSET', waiters_key, waiter_id, rec)
  return {'defer', reason, retry, device, '', 0, detail, -1}
end

-- Redis lost its state and a gate that knew the pool restored its policy:
-- the leases held then are unknown until their holders' heartbeats put
-- them back (renew_leases.lua); nothing is admitted meanwhile.
local recover = tonumber(st[10])
if recover and recover > now then
  return defer('recovering', recover - now, '', '-',
               'Redis lost its state: the leases held before come back first')
end

-- Overrides: a pause (drain pauses several classes) and a runtime cap.
if st[4] then
  local until_ms = tonumber(st[4])
  if until_ms == 0 or until_ms > now then
    local retry = retry_max
    if until_ms > 0 then retry = until_ms - now end
    -- A paused class does not age: after a long drain its requests would
    -- outrank the classes the drain kept running.
    since = now
    return defer('paused', retry, '', '-', 'class paused')
  end
end
if st[5] then
  local n, until_ms = string.match(st[5], '^(%S+) (%S+)$')
  n, until_ms = tonumber(n), tonumber(until_ms)
  if (until_ms == 0 or until_ms > now) and (cap < 0 or n < cap) then cap = n end
end

-- Candidate devices: the caller's, each with the freshest sample known.
local cand = {}
local fresher = {}
local stored = {}
local listed_uuids = {}  -- the devices this request listed (its host's), as a set
-- Devices the caller listed (and insisted on, if it did), fresh or not, and
-- whether one of them could ever hold the request: capacity does not go
-- stale, so "never fits" looks at them all.
local listed, fits_listed = 0, false
if n_samples > 0 then
  local uuids = {}
  for i = 0, n_samples - 1 do
    uuids[i + 1] = ARGV[11 + 4 * i]
    listed_uuids[uuids[i + 1]] = true
  end
  stored = redis.call('HMGET', samples_key, unpack(uuids))
end
-- The samples' times, on this clock: see sent_ms above.
if sent_ms <= 0 or sent_ms > now then sent_ms = now end
for i = 0, n_samples - 1 do
  local base = 11 + 4 * i
  local uuid = ARGV[base]
  if want_device == '' or want_device == uuid then
    local total = tonumber(ARGV[base + 1])
    local used = tonumber(ARGV[base + 2])
    local ts = sent_ms - tonumber(ARGV[base + 3])
    local s = stored[i + 1]
    local s_ts = -1
    if s then
      local s_total, s_used
      s_total, s_used, s_ts = string.match(s, '^(%d+) (%d+) (%d+)')
      s_ts = tonumber(s_ts)
      if s_ts >= ts then total, used, ts = tonumber(s_total), tonumber(s_used), s_ts end
    end
    -- Keep the stored sample fresh for other hosts and status, writing at
    -- most every 100 ms per device: this decision uses its own sample anyway
    -- (but see the ghosts below).
    local written = ts >= s_ts + 100
    if written then
      fresher[#fresher + 1] = uuid
      fresher[#fresher + 1] = total .. ' ' .. used .. ' ' .. ts
    end
    listed = listed + 1
    if could_hold(total) then fits_listed = true end
    if now - ts <= max_age then
      cand[#cand + 1] = {uuid = uuid, total = total, used = used, ts = ts, s_ts = s_ts,
                         written = written}
    end
  end
end
if #fresher > 0 then redis.call('HSET', samples_key, unpack(fresher)) end

-- GPU presence.
if #cand == 0 then
  if listed > 0 then
    return defer('stale_sample', estimate, '', '-', 'no fresh sample of any device')
  end
  if no_gpu == 'cpu' then
    redis.call('HDEL', waiters_key, waiter_id)
    return {'admit', 'cpu', 0, '', '', 0, 'no GPU visible: run on the CPU', -1}
  elseif no_gpu == 'reject' then
    return {'reject', 'no_gpu', 0, '', '', 0, 'no GPU visible', -1}
  end
  return defer('no_gpu', estimate, '', '-', 'no GPU visible')
end

-- Never fits: judged against capacity, never against current use.
local fits_ever = false
for _, d in ipairs(cand) do
  if could_hold(d.total) then fits_ever = true end
end
if not fits_ever then
  if fits_listed then
    return defer('stale_sample', estimate, '', '-', 'only devices without a fresh sample could hold it')
  end
  return {'reject', 'too_large', 0, '', '', 0, 'larger than any device can hold for this class', -1}
end

-- Class cap across the pool (configured, lowered by a runtime override).
if cap >= 0 and (tonumber(st[6]) or 0) >= cap then
  return defer('cap', estimate, '', '-', 'class at its cap of ' .. cap)
end

-- Per-device caps: this class's, and the slots shared by all classes.
local fields = {}
for i, d in ipairs(cand) do
  fields[3 * i - 2] = 'd:' .. cls .. ':' .. d.uuid
  fields[3 * i - 1] = 'd::' .. d.uuid
  fields[3 * i] = 'm:' .. d.uuid
end
local counts = redis.call('HMGET', state_key, unpack(fields))
local slotted = {}
local slot_blocked = nil
for i, d in ipairs(cand) do
  d.n_cls = tonumber(counts[3 * i - 2]) or 0
  d.n_all = tonumber(counts[3 * i - 1]) or 0
  d.m_res, d.m_act, d.m_at, d.m_idle = parse_memory(counts[3 * i])
  if dev_cap < 0 or d.n_cls < dev_cap then
    if shared_cap < 0 or d.n_all < shared_cap then
      slotted[#slotted + 1] = d
    elseif not slot_blocked then
      slot_blocked = d.uuid
    end
  end
end
if #slotted == 0 then
  if slot_blocked then
    return defer('cap', estimate, slot_blocked, 'slot', 'every device at its job limit')
  end
  return defer('cap', estimate, '', '-', 'class at its per-device cap')
end
-- When only devices at a limit could ever hold it, it waits for that limit
-- (a shared slot there, or its own class's per-device cap, which holds back
-- nobody), not for memory on a device too small for it.
local slotted_holds = false
for _, d in ipairs(slotted) do
  if could_hold(d.total) then slotted_holds = true end
end
if not slotted_holds then
  for _, d in ipairs(cand) do
    if could_hold(d.total) and (dev_cap < 0 or d.n_cls < dev_cap) then
      return defer('cap', estimate, d.uuid, 'slot', 'the devices that could hold it are at their job limit')
    end
  end
  return defer('cap', estimate, '', '-', 'class at its per-device cap on the devices that could hold it')
end

-- Devices that a live waiter of higher effective priority waits for (the
-- one closest to fitting it, or whose slot it waits for). Waiting ages
-- priority, so batch is not starved forever. A waiter for memory or for a
-- shared slot of this request's host (the device it waits for is one of the
-- listed ones) also holds back any device where it could go now and could
-- not once this request took its share (see place_taken below); another
-- host's waiter cannot use this host's devices.
local blocked = {}
local wanted = {}  -- the waiters of this host: {eff, v, pin, reserve}
local waiting = false
local waiters = redis.call('HGETALL', waiters_key)
for i = 1, #waiters, 2 do
  local id = waiters[i]
  local p, s, v, w, x, d = waiter_fields(waiters[i + 1])
  if id == waiter_id then
    if tonumber(x) > now then since = tonumber(s) else since = now end
    waiting = true
  elseif tonumber(x) <= now then
    frees[#frees + 1] = {'HDEL', waiters_key, id}
  elseif w ~= '-' and d ~= '-' then
    local eff = tonumber(p) + aging * (now - tonumber(s))
    if blocked[d] == nil or eff > blocked[d] then blocked[d] = eff end
    if listed_uuids[d] then
      local reserve, pinned = waiter_hold(waiters[i + 1])
      -- A pinned waiter can use only its device.
      wanted[#wanted + 1] = {eff = eff, v = tonumber(v), pin = pinned and d or nil, reserve = reserve}
    end
  end
end
local my_eff = my_prio + aging * (now - my_since())
for d, eff in pairs(blocked) do
  if eff <= my_eff then blocked[d] = nil end
end
local needs = {}  -- the waiters of this host above this request
for _, e in ipairs(wanted) do
  if e.eff > my_eff then needs[#needs + 1] = e end
end

-- Whether this request would take the place of a waiter above it on device
-- d, with `free` bytes before class reserves: the waiter could go there now
-- (its VRAM and its own class's reserve fit; d has a free shared slot, or it
-- would not be a candidate), and could not after this request, which takes
-- that room or d's last free shared slot. Nor the room those that could go
-- there now need together (two waiters of 20 GiB and 45 GiB free: a 10 GiB
-- request takes what one of them needs). The waiters' own class caps are
-- not known here: they count as if they let them go.
local function place_taken(d, free)
  local last_slot = shared_cap >= 0 and d.n_all + 1 >= shared_cap
  local together, reserve = 0, 0
  for _, need in ipairs(needs) do
    local left = free - need.reserve - need.v
    if (need.pin == nil or need.pin == d.uuid) and left >= 0 then
      if last_slot or left < vram then return true end
      together = together + need.v
      if need.reserve > reserve then reserve = need.reserve end
    end
  end
  local left = free - reserve - together
  return together > 0 and left >= 0 and left < vram
end

-- Ghosts end once a sample taken after their release is used: they leave
-- the device's memory sums and their records go. So do the ghosts, on other
-- devices, released before the oldest sample a decision may use (now -
-- max_age): any decision that looks at their device has a sample taken after
-- them. This read takes the oldest 256; without that second rule, 256 ghosts
-- of devices nobody samples any more (a host gone with its leases) would fill
-- it, and no other ghost would end again.
local by_uuid = {}
local newest_ts = 0
for _, d in ipairs(slotted) do
  by_uuid[d.uuid] = d
  if d.ts > newest_ts then newest_ts = d.ts end
end
local ghosts_key = prefix .. 'ghosts'
local ended = {}  -- uuid -> {lease id = true}: ghosts ended here, deleted at the end
-- End ghost `id` (record `rec`) of device d: its memory leaves d's sums
-- (written back below) and its record goes at the end.
local function end_ghost(d, id, rec)
  d.m_res = d.m_res - math.max(rec.e, rec.a)
  d.m_act = d.m_act - rec.a
  d.m_idle = d.m_idle - rec.f
  d.m_dirty = true
  ended[d.uuid] = ended[d.uuid] or {}
  ended[d.uuid][id] = true
  frees[#frees + 1] = {'HDEL', prefix .. 'dev:' .. d.uuid, id}
end
local others = {}  -- memory sums of other devices with ghosts ended here, by uuid
local gone = redis.call('ZRANGEBYSCORE', ghosts_key, '-inf', newest_ts - 1, 'WITHSCORES', 'LIMIT', 0, 256)
for i = 1, #gone, 2 do
  local member = gone[i]
  local tab = string.find(member, '\t', 1, true)
  local uuid = string.sub(member, 1, tab - 1)
  local d = by_uuid[uuid]
  if not d and tonumber(gone[i + 1]) < now - max_age then
    d = others[uuid]
    if not d then
      d = {uuid = uuid}
      d.m_res, d.m_act, d.m_at, d.m_idle = parse_memory(redis.call('HGET', state_key, 'm:' .. uuid))
      others[uuid] = d
    end
  elseif d and tonumber(gone[i + 1]) >= d.ts then
    d = nil
  end
  if d then
    local dkey = prefix .. 'dev:' .. d.uuid
    local id = string.sub(member, tab + 1)
    local raw = redis.call('HGET', dkey, id)
    if raw then end_ghost(d, id, parse_lease(raw)) end
    frees[#frees + 1] = {'ZREM', ghosts_key, member}
  end
end
-- A full read may have left this request's own devices' ghosts out (more
-- than 256 older ones pool-wide: a wave of jobs ending at once): those are
-- found in their devices' records instead, else its idle GPUs would look
-- full until the wave had ended elsewhere.
if #gone == 512 then
  for _, d in ipairs(slotted) do
    local dkey = prefix .. 'dev:' .. d.uuid
    local rows = redis.call('HGETALL', dkey)
    local here = ended[d.uuid] or {}
    for j = 1, #rows, 2 do
      local id = rows[j]
      local rec = parse_lease(rows[j + 1])
      if rec.r > 0 and rec.r < d.ts and not here[id] then
        end_ghost(d, id, rec)
        frees[#frees + 1] = {'ZREM', ghosts_key, d.uuid .. '\t' .. id}
      end
    end
  end
end
-- A ghost ended here on this decision's sample is gone for every decision,
-- and another gate on the device may hold a sample from before its release:
-- the stored sample, which every decision weighs against its own, must be
-- this one then, however recent the last write.
local newer = {}
for uuid in pairs(ended) do
  local d = by_uuid[uuid]
  if d and not d.written and d.ts > d.s_ts then
    newer[#newer + 1] = uuid
    newer[#newer + 1] = d.total .. ' ' .. d.used .. ' ' .. d.ts
  end
end
if #newer > 0 then redis.call('HSET', samples_key, unpack(newer)) end

-- VRAM per device: reserved = sum max(est, actual) over leases and ghosts;
-- unmanaged = used - sum of actuals measured no later than the sample. Both
-- sums are kept per device; only a sample older than the latest reported
-- actual needs the leases one by one. The closest to fitting (the device a
-- DEFER waits for, which lower classes are then kept off) is the one with the
-- most room among those whose capacity could ever hold the request: waiting
-- for room on one that never could would send lower classes onto the device
-- it needs. Only when no slotted device could is it the one with most room.
local best, best_avail, closest, closest_avail, closest_holds = nil, nil, nil, nil, false
local held_back, fragmented = false, false
-- For a DEFER fragmented: the one with the most room among the devices
-- not too fragmented for it that could ever hold it (it waits for memory
-- there, not on the others, nor on one too small).
local usable, usable_avail = nil, nil
for _, d in ipairs(slotted) do
  local reserved, measured = d.m_res, d.m_act
  if d.m_at > d.ts then
    measured = 0
    local latest = 0
    local leases = redis.call('HGETALL', prefix .. 'dev:' .. d.uuid)
    local gone_here = ended[d.uuid] or {}
    for j = 2, #leases, 2 do
      local a, at = string.match(leases[j], '^%d+ (%d+) (%d+)')
      a, at = tonumber(a), tonumber(at)
      if a > 0 and not gone_here[leases[j - 1]] then
        if at <= d.ts then measured = measured + a end
        if at > latest then latest = at end
      end
    end
    if latest ~= d.m_at then d.m_at, d.m_dirty = latest, true end
  end
  local unmanaged = d.used - measured
  if unmanaged < 0 then unmanaged = 0 end
  local avail = d.total - unmanaged - reserved - margin - reserve_above
  if avail >= vram then
    if max_frag >= 0 and d.m_idle > max_frag * d.total then
      fragmented = true
    elseif blocked[d.uuid] or (#needs > 0 and place_taken(d, d.total - unmanaged - reserved - margin)) then
      held_back = true
    elseif best == nil
        or (placement == 'spread' and avail > best_avail)
        or (placement ~= 'spread' and avail < best_avail) then
      best, best_avail = d, avail
    end
  end
  local holds = could_hold(d.total)
  if closest == nil or (holds and not closest_holds) or (holds == closest_holds and avail > closest_avail) then
    closest, closest_avail, closest_holds = d, avail, holds
  end
  if holds and not (max_frag >= 0 and d.m_idle > max_frag * d.total)
      and (usable == nil or avail > usable_avail) then
    usable, usable_avail = d, avail
  end
end
-- Memory sums changed above (ghosts ended, latest_at moved) are written
-- back: with the lease's own state write on an ADMIT, else before the DEFER.
local function dirty_fields(skip)
  local fields = {}
  for _, d in ipairs(slotted) do
    if d.m_dirty and d ~= skip then
      fields[#fields + 1] = 'm:' .. d.uuid
      fields[#fields + 1] = format_memory(d.m_res, d.m_act, d.m_at, d.m_idle)
    end
  end
  for uuid, d in pairs(others) do
    fields[#fields + 1] = 'm:' .. uuid
    fields[#fields + 1] = format_memory(math.max(0, d.m_res), math.max(0, d.m_act), d.m_at,
                                        math.max(0, d.m_idle))
  end
  return fields
end
local function write_dirty()
  local fields = dirty_fields(nil)
  if #fields > 0 then redis.call('HSET', state_key, unpack(fields)) end
end

if best == nil then
  write_dirty()
  if held_back then
    local r = defer('priority', estimate, closest.uuid, 'vram', 'a higher-priority request waits for room on this device')
    r[8] = closest_avail
    return r
  end
  -- Kept off the devices with room, it waits for memory on the others, and
  -- holds back there like any waiter for memory; with none, for their
  -- fragmentation to fall, holding back nobody.
  if fragmented then
    local detail = 'the devices with room are too fragmented for this class'
    local r
    if usable then
      r = defer('fragmented', estimate, usable.uuid, 'vram', detail)
      r[8] = usable_avail
    else
      r = defer('fragmented', estimate, '', '-', detail)
      r[8] = closest_avail
    end
    return r
  end
  local r = defer('vram', estimate, closest.uuid, 'vram', 'not enough free memory on any device')
  r[8] = closest_avail
  return r
end

-- Token bucket, last: tokens are taken only when everything else passes.
if rate > 0 then
  local tokens, updated = burst, now
  local b = redis.call('HGET', buckets_key, cls)
  if b then
    tokens, updated = bucket_fields(b)
    if now > updated then tokens = math.min(burst, tokens + (now - updated) * rate) end
  end
  if tokens < 1 then
    write_dirty()
    local r = defer('rate', math.ceil((1 - tokens) / rate), best.uuid, '-', 'token bucket empty')
    r[8] = best_avail
    return r
  end
  redis.call('HSET', buckets_key, cls, format_bucket(tokens - 1, now))
end

-- The lease; its id is a fencing token: above every id issued before, even
-- after Redis lost its state (restarted empty, restored from an older
-- snapshot, failed over to a lagging replica): ids run at least with the
-- clock, 1000 per ms (under 2**53 until the year 2255). The counters were
-- read above in this same script, so they are written back whole, with the
-- clock.
local id = string.format('%d', math.max((tonumber(st[7]) or 0) + 1, now * 1000))
local deadline = 0
if max_ms >= 0 then deadline = now + max_ms end
admitted_deadline = deadline
local rec = {e = vram, a = 0, at = 0, r = 0, c = cls, s = now, m = deadline, o = owner, f = 0,
             t = tenant ~= '' and tenant or '-'}
redis.call('HSET', prefix .. 'dev:' .. best.uuid, id, format_lease(rec))
redis.call('ZADD', exp_key, now + ttl, best.uuid .. '\t' .. id)
local more = dirty_fields(best)
if now + ttl < next_exp then
  more[#more + 1] = 'next_exp'
  more[#more + 1] = now + ttl
end
-- A pool whose policy an older gate stored has no epoch: its first lease
-- here starts one (unique: ids are), so that a later loss can be told.
if epoch == '' then
  epoch = 'a' .. id
  more[#more + 1] = 'epoch'
  more[#more + 1] = epoch
end
redis.call('HSET', state_key, 'seq', id, 'clock', now, 'n:' .. cls, (tonumber(st[6]) or 0) + 1,
           'd:' .. cls .. ':' .. best.uuid, best.n_cls + 1, 'd::' .. best.uuid, best.n_all + 1,
           'm:' .. best.uuid, format_memory(best.m_res + vram, best.m_act, best.m_at, best.m_idle),
           unpack(more))
if waiting then redis.call('HDEL', waiters_key, waiter_id) end
return {'admit', 'ok', 0, best.uuid, id, now + ttl, '', best_avail}
end

-- Count every answer per minute for status ("admitted/deferred/rejected in
-- the last minutes"): P dec:<minute> hash "class outcome reason" -> count,
-- kept 16 minutes. Error replies are not answers.
local reply = decide()
-- The deletions before the count: the per-minute key is built here, not in
-- KEYS, and while a Redis Cluster slot migrates it may be on the other node;
-- failing there must not leave ended ghosts whose memory already left the
-- sums (the next decision would take it off again).
for _, f in ipairs(frees) do redis.call(f[1], f[2], f[3]) end
if reply[1] then
  reply[9] = version
  reply[10] = now
  reply[11] = epoch
  if admitted_deadline then reply[12] = admitted_deadline end
  local key = prefix .. 'dec:' .. math.floor(now / 60000)
  if redis.call('HINCRBY', key, cls .. ' ' .. reply[1] .. ' ' .. reply[2], 1) == 1 then
    redis.call('PEXPIRE', key, 16 * 60000)
  end
end
return reply
