-- _prelude.lua: record formats and helpers shared by every gpugate script.
-- The loader prepends this file to each script, so scripts call these locals
-- by name.
--
-- Records are space-separated fields (parsing them costs a fraction of JSON):
--   lease   "e a at r c s m o f t"   estimate, actual (bytes), actual
--           measured (ms), released (ms, 0 while live), class, start (ms),
--           max deadline (ms, 0 = none), owner, allocator-idle bytes (held by
--           the job's allocator but not in use: its fragmentation), tenant
--           ("-" = none)
--   waiter  "p s v w x d c r a k"  priority, since (ms), vram, what it waits
--           for ("vram" | "slot" | "-"), expiry (ms), device ("-" = none),
--           class, reason, the class's reserve_above (bytes: the reserves of
--           the classes above it, which it must leave free), and "pinned"
--           when the request named its device (it can use no other), else
--           "-". Gates of the previous release write the first eight fields
--           only (and read the first six): such a record reads as reserve 0,
--           not pinned
--   sample  "total used taken_ms"
--   memory  "reserved actual latest_at idle"   per device, state field
--           m:<uuid>: the sums over its leases and ghosts of max(estimate,
--           actual) and of actual, the latest time an actual was measured (a
--           decision whose sample is newer needs no lease loop), and the
--           device's fragmentation: the sum of its leases' and ghosts'
--           allocator-idle bytes plus the idle excess of idle registered
--           workers there (renew_leases.lua)
--   class   "prio cap dev_cap rate_per_ms burst reserve_above max_ms
--            max_contended_ms no_gpu max_frag" (-1 = none)
--   pool    "margin ttl_ms placement max_age_ms waiter_ttl_ms aging_per_ms
--            retry_max_ms max_per_device"      (-1 = none)
--
-- pool_fields(raw), class_fields(raw) -> the record's fields in order
--   (strings); waiter_fields(raw) -> its first six (p s v w x d);
--   waiter_hold(raw) -> reserve_above (number), pinned (boolean): its last
--   two, parsed only for the waiters that may hold a request back;
--   bucket_fields(raw) -> tokens, updated (numbers); format_bucket(tokens,
--   updated) -> string. Every script reads these records through them.
-- script_now(clock_ms, last) -> ms: max(TIME or clock_ms when > 0, last).
-- wake(prefix, message): PUBLISH on P wake, never failing the script.
-- parse_lease(raw) -> table; format_lease(rec) -> string.
-- end_lease(prefix, state_key, uuid, id, rec, now, counter): make a live
--   lease a ghost released at `now` (its memory keeps counting until a later
--   sample; P ghosts lists ghosts by release time), drop its counts, count
--   `counter`, wake waiters: P wake gets "<uuid> <class>", what the end
--   freed (a slot on the device, one of the class's count; a gate wakes
--   only the waiters that may use them, admission/_herd.py). Other
--   publishers send a single word ("override"): that wakes every waiter, as
--   does the bare uuid that gates of the previous release published.
-- parse_memory(raw) -> reserved, actual, latest_at, idle (0s when absent);
--   format_memory(reserved, actual, latest_at, idle) -> string.
-- reap_expired(prefix, state_key, exp_key, now, next_exp): end up to 64
--   expired leases, but only once `now` reaches next_exp, the state field
--   "next_exp" holding a lower bound of the earliest expiry (admissions lower
--   it; renewals only push expiries later and releases only remove them, so
--   it stays a lower bound; with no lease it is NO_EXPIRY). Returns how many
--   leases it ended and the bound after the call: still <= now when expired
--   leases are left for later calls. Each ended lease counts in state
--   "expired:<class>" (its holder stopped renewing it), or in
--   "out:<class>:max_duration" when its expiry lay past its max deadline
--   (lease record field m): its last renewal (or its admission) came within
--   the TTL before that deadline, and renewal stops there (renew_leases.lua,
--   status 2), so the class's max_duration ended it, not a silent holder. A
--   holder that died within that last TTL counts there too: its lease ended
--   no later than the deadline would have ended it. So does a lease that
--   max_duration_contended ended (renew_leases.lua records that deadline in
--   field m when it is reached). The bound keeps one call short: each ended lease costs about
--   ten commands (64 take some 0.7 ms of server time, 256 some 3 to 5 ms);
--   admit_job.lua answers short retries while leases are left, so that
--   callers come back and reap on.

local function script_now(clock_ms, last)
  local now = clock_ms
  if now <= 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  if now < last then return last end
  return now
end

local function pool_fields(raw)
  return string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
end

local function class_fields(raw)
  return string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
end

local function waiter_fields(raw)
  return string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)')
end

local function waiter_hold(raw)
  local a, k = string.match(raw, '^%S+ %S+ %S+ %S+ %S+ %S+ %S+ %S+ (%d+) (%S+)$')
  if not a then return 0, false end
  return tonumber(a), k == 'pinned'
end

local function bucket_fields(raw)
  local tokens, updated = string.match(raw, '^(%S+) (%S+)$')
  return tonumber(tokens), tonumber(updated)
end

local function format_bucket(tokens, updated)
  return string.format('%.17g %d', tokens, updated)
end

local function parse_lease(raw)
  local e, a, at, r, c, s, m, o, f, t =
    string.match(raw, '^(%d+) (%d+) (%d+) (%d+) (%S+) (%d+) (%d+) (%S+) (%d+) (.*)$')
  return {e = tonumber(e), a = tonumber(a), at = tonumber(at), r = tonumber(r), c = c,
          s = tonumber(s), m = tonumber(m), o = o, f = tonumber(f), t = t}
end

local function parse_memory(raw)
  if not raw then return 0, 0, 0, 0 end
  local r, a, t, f = string.match(raw, '^(%S+) (%S+) (%S+) (%S+)$')
  return tonumber(r), tonumber(a), tonumber(t), tonumber(f)
end

local function format_memory(r, a, t, f)
  return string.format('%d %d %d %d', r, a, t, f)
end

local function format_lease(rec)
  return string.format('%d %d %d %d %s %d %d %s %d %s', rec.e, rec.a, rec.at, rec.r, rec.c, rec.s, rec.m,
                       rec.o, rec.f, rec.t)
end

-- Wake the gates' blocked admissions (P wake; message as in state/_keys.py).
-- A wake-up only saves a wait until the next retry, and a script's writes
-- stand once made: with an ACL user refused PUBLISH, the call must not fail
-- after them (the caller would report a change that took effect as failed,
-- and send it again).
local function wake(prefix, message)
  redis.pcall('PUBLISH', prefix .. 'wake', message)
end

local function end_lease(prefix, state_key, uuid, id, rec, now, counter)
  rec.r = now
  -- A ghost keeps its memory counted until a sample taken after `now`. Its
  -- entry first: ghosts is built here, not in KEYS, and on a Redis Cluster
  -- slot in migration it may be elsewhere; failing then leaves this lease whole.
  redis.call('ZADD', prefix .. 'ghosts', now, uuid .. '\t' .. id)
  redis.call('HSET', prefix .. 'dev:' .. uuid, id, format_lease(rec))
  redis.call('HINCRBY', state_key, 'n:' .. rec.c, -1)
  redis.call('HINCRBY', state_key, 'd:' .. rec.c .. ':' .. uuid, -1)
  redis.call('HINCRBY', state_key, 'd::' .. uuid, -1)
  redis.call('HINCRBY', state_key, counter, 1)
  wake(prefix, uuid .. ' ' .. rec.c)
end

local NO_EXPIRY = 99999999999999

local function reap_expired(prefix, state_key, exp_key, now, next_exp)
  if next_exp ~= nil and now < next_exp then return 0, next_exp end
  local expired = redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 64)
  for i = 1, #expired, 2 do
    local member = expired[i]
    local tab = string.find(member, '\t', 1, true)
    local uuid = string.sub(member, 1, tab - 1)
    local id = string.sub(member, tab + 1)
    local raw = redis.call('HGET', prefix .. 'dev:' .. uuid, id)
    if raw then
      local rec = parse_lease(raw)
      if rec.r == 0 then
        local counter = 'expired:' .. rec.c
        if rec.m > 0 and tonumber(expired[i + 1]) > rec.m then
          counter = 'out:' .. rec.c .. ':max_duration'
        end
        end_lease(prefix, state_key, uuid, id, rec, now, counter)
      end
    end
    redis.call('ZREM', exp_key, member)
  end
  local first = redis.call('ZRANGE', exp_key, 0, 0, 'WITHSCORES')
  next_exp = tonumber(first[2]) or NO_EXPIRY
  redis.call('HSET', state_key, 'next_exp', string.format('%d', next_exp))
  return #expired / 2, next_exp
end
