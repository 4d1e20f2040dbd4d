-- renew_leases.lua: extend the leases one process holds, in one call.
--
-- KEYS = [state, exp, waiters, workers, workerinfo, idlemem, idleseen, samples]
--   (and P gpus, built from the prefix)
-- ARGV = [prefix, clock_ms, owner, info, host, gpus, excess, n,
--         (uuid, id, actual, actual_age_ms, idle,
--          epoch, class, estimate, start_ms, deadline_ms, tenant, holder) * n]
--   actual < 0 leaves the reported actual VRAM (and idle, the bytes its
--   allocator holds unused) as they were. The rest of each lease's entry is
--   what its admission wrote (epoch: the pool's then, admit_job.lua), for a
--   lease Redis lost: one neither live nor a ghost here, granted in another
--   epoch of the pool or with an id above the last one issued (Redis lost
--   its state, or came back from an older snapshot) is put back as it was,
--   counted again, status 3 (its job runs on), whatever its class (one the
--   policy no longer has still holds its memory), and the recovery window
--   (state recover, see publish_policy.lua) is extended to a TTL from now.
--   A lease this state ended (expired, reaped, released) is never put back:
--   its id is at most the last issued and its epoch the pool's. owner "" renews
--   without registering; otherwise the call is also the worker's heartbeat:
--   workers (zset) owner -> last beat ms, workerinfo (hash) owner -> info
--   (JSON from the gate). Workers silent for 10 TTLs are pruned here, with
--   their gpus entry.
--   gpus: the worker's last snapshot of its host's GPUs (JSON: its host,
--   devices with utilisation, faults, quarantined devices), stored as
--   gpus[owner] = "<now> <json>" so status and metrics see every worker's
--   GPUs from anywhere; "" stores nothing, and so does a call without an
--   owner (nothing would remove its entry). Keyed by worker, not host: gates
--   of one host name may see different devices (host-network containers), and
--   readers merge the entries per device. host: the host's name, under which
--   the previous version kept one entry per host; a beat removes that entry
--   once it is 10 TTLs old (no gate of that version beats there any more).
--   samples: the devices' freshest samples, written by admit_job. A beat,
--   registered or not, removes those taken 10 TTLs ago or earlier (and never
--   within 2 minutes, the window after which status and metrics count a
--   device as stopped reporting: state/_inspect.py REPORT_WINDOW_S): a host
--   that died, or a GPU taken out, would leave its last figures there for
--   good. A device still seen is not lost with its entry: its host's gpus
--   snapshot, or its next decision's own sample, stands in. The hash holds
--   one entry per device and every worker beats every TTL/3, so it is read
--   at most once per TTL pool-wide: state field swept = the last time.
--   A device whose sample goes leaves the state with it: its ghosts released
--   before the oldest sample a decision may use end (as admit_job.lua ends
--   them), and its count and memory fields (d::<uuid>, d:<class>:<uuid>,
--   m:<uuid>) are deleted. Not while it holds a live lease, a ghost released
--   since, or idle workers' memory: its sample then stays for a later sweep.
--   The same sweep deletes waiter entries past their expiry.
--   excess: the worker's idle excess, "<uuid> <bytes> <uuid> <bytes> ..."
--   (what NVML shows for its pid on each device above its warm baseline
--   while it holds no lease); "" none; "-" leaves it as it was. Ignored
--   without an owner.
-- -> {now, policy version ("" without), (status, expires_ms) * n, epoch}: the
--    version lets a gate follow a policy applied while it runs (a changed
--    lease TTL changes how often it must renew); status 1 renewed; 0 gone (expired,
--    reaped or released: never recreated, the id is a fencing token); 2 past
--    its class's max duration (not renewed: it ends at expires_ms); 3 put
--    back (see above). epoch: the pool's, "" for a pool made before epochs.
--
-- Key schema and record formats: see admit_job.lua and the prelude. The max
-- duration is the class's max_ms, or max_contended_ms while a live waiter
-- of higher effective priority than the lease's class (priority + aging x
-- time waited) wants memory on the lease's device (once reached, it becomes
-- the lease's own deadline, record field m); whatever memory the holder
-- keeps after its lease ends counts as unmanaged through the samples.
--
-- Idle excess (P idlemem hash: owner -> "<uuid> <bytes> ..."; P idleseen
-- zset: owner -> last beat ms, for owners with an entry) is part of each
-- device's fragmentation: the idle field of its memory record m:<uuid> is
-- the sum over leases and ghosts of their allocator-idle bytes plus the sum
-- of the workers' idle excess there, kept by deltas so that admit_job reads
-- one field. An entry counts while its worker beats, like a lease: one TTL
-- after its last beat any renewal takes it out (a dead worker's memory is
-- freed by the driver); remove_worker.lua takes it out on close.

local state_key = KEYS[1]
local exp_key = KEYS[2]
local waiters_key = KEYS[3]
local workers_key = KEYS[4]
local workerinfo_key = KEYS[5]
local idlemem_key = KEYS[6]
local idleseen_key = KEYS[7]
local samples_key = KEYS[8]

local prefix = ARGV[1]
local clock_ms = tonumber(ARGV[2])
local owner = ARGV[3]
local info = ARGV[4]
local host = ARGV[5]
local gpus = ARGV[6]
local excess = ARGV[7]
local n = tonumber(ARGV[8])
local STRIDE = 12  -- ARGV per lease
local gpus_key = prefix .. 'gpus'

local st = redis.call('HMGET', state_key, 'clock', 'pool', 'next_exp', 'pversion', 'swept', 'classes',
                      'epoch', 'seq', 'recover')
-- Every key built here (not in KEYS) is read before the first write: on Redis
-- Cluster, while the pool's slot migrates, one may be on the other node
-- already, and the script must fail before it writes (Redis does not undo
-- writes), so that the beat is sent again whole.
redis.call('EXISTS', gpus_key)
redis.call('EXISTS', prefix .. 'ghosts')
local records = {}
for i = 0, n - 1 do
  local base = 9 + STRIDE * i
  records[i] = redis.call('HGET', prefix .. 'dev:' .. ARGV[base], ARGV[base + 1])
end
local last = tonumber(st[1]) or 0
local now = script_now(clock_ms, last)

-- The sample sweep's reads (see samples above): the samples nobody refreshed
-- for 10 TTLs, and what their devices still hold.
local ttl, max_age, aging
if st[2] then
  local _
  ttl, _, max_age, _, aging = select(2, pool_fields(st[2]))
  ttl, max_age, aging = tonumber(ttl), tonumber(max_age), tonumber(aging)
end
local sweep = ttl ~= nil and now - (tonumber(st[5]) or 0) >= ttl
local unseen = {}  -- {uuid, dev key's rows, memory record, device count}
if sweep then
  local oldest = now - math.max(10 * ttl, 120000)
  local rows = redis.call('HGETALL', samples_key)
  for i = 1, #rows, 2 do
    -- An entry that cannot be read goes too: no decision could use it.
    local taken = tonumber(string.match(rows[i + 1], '^%d+ %d+ (%d+)'))
    if taken == nil or taken <= oldest then unseen[#unseen + 1] = {uuid = rows[i]} end
  end
  if #unseen > 0 then
    local fields = {}
    for j, d in ipairs(unseen) do
      d.rows = redis.call('HGETALL', prefix .. 'dev:' .. d.uuid)
      fields[2 * j - 1] = 'm:' .. d.uuid
      fields[2 * j] = 'd::' .. d.uuid
    end
    local vals = redis.call('HMGET', state_key, unpack(fields))
    for j, d in ipairs(unseen) do d.m, d.n = vals[2 * j - 1], tonumber(vals[2 * j]) or 0 end
  end
end

if now > last then redis.call('HSET', state_key, 'clock', now) end
if not st[2] then return redis.error_reply('nopolicy') end
local _, next_exp = reap_expired(prefix, state_key, exp_key, now, tonumber(st[3]))

-- Whether a live waiter for memory on device `uuid` is above `prio`: its
-- effective priority, aged as admit_job.lua ages it, above the lease class's
-- priority. A waiter of a lower class (batch behind a notebook) waits its
-- turn and shortens nothing.
local contended = nil  -- uuid -> the highest effective priority waiting there
local function device_contended(uuid, prio)
  if contended == nil then
    contended = {}
    local waiters = redis.call('HGETALL', waiters_key)
    for i = 2, #waiters, 2 do
      local p, s, _, w, x, d = waiter_fields(waiters[i])
      if w == 'vram' and tonumber(x) > now then
        local eff = tonumber(p) + aging * (now - tonumber(s))
        if contended[d] == nil or eff > contended[d] then contended[d] = eff end
      end
    end
  end
  return contended[uuid] ~= nil and contended[uuid] > prio
end

-- A class's max_contended_ms (-1: none) and priority.
local bounds = {}
local function class_bounds(cls)
  if bounds[cls] == nil then
    local raw = redis.call('HGET', state_key, 'c:' .. cls)
    if raw then
      local prio, _, _, _, _, _, _, short = class_fields(raw)
      bounds[cls] = {tonumber(short), tonumber(prio)}
    else
      bounds[cls] = {-1, 0}
    end
  end
  return bounds[cls][1], bounds[cls][2]
end

-- The devices' memory sums change with each reported actual and idle
-- excess; read once, written once.
local memory = {}
local function memory_of(uuid)
  local m = memory[uuid]
  if m == nil then
    local r0, a0, t0, f0 = parse_memory(redis.call('HGET', state_key, 'm:' .. uuid))
    m = {r0, a0, t0, f0}
    memory[uuid] = m
  end
  return m
end

-- Add `sign` times each "<uuid> <bytes>" of `entry` to its device's idle sum.
local function count_excess(entry, sign, deltas)
  for uuid, bytes in string.gmatch(entry, '(%S+) (%d+)') do
    deltas[uuid] = (deltas[uuid] or 0) + sign * tonumber(bytes)
  end
end

local function apply(deltas)
  for uuid, delta in pairs(deltas) do
    if delta ~= 0 then
      local m = memory_of(uuid)
      m[4] = m[4] + delta
    end
  end
end

local function drop_excess(who)
  local old = redis.call('HGET', idlemem_key, who)
  if old then
    local deltas = {}
    count_excess(old, -1, deltas)
    apply(deltas)
    redis.call('HDEL', idlemem_key, who)
  end
  redis.call('ZREM', idleseen_key, who)
end

if owner ~= '' then
  redis.call('ZADD', workers_key, now, owner)
  redis.call('HSET', workerinfo_key, owner, info)
  if gpus ~= '' then
    redis.call('HSET', gpus_key, owner, now .. ' ' .. gpus)
    if host ~= '' and host ~= owner then
      local legacy = redis.call('HGET', gpus_key, host)
      if legacy and (tonumber(string.match(legacy, '^(%d+)')) or 0) <= now - 10 * ttl then
        redis.call('HDEL', gpus_key, host)
      end
    end
  end
  if excess ~= '-' then
    local old = redis.call('HGET', idlemem_key, owner)
    if excess == '' then
      if old then drop_excess(owner) end
    else
      if old ~= excess then
        local deltas = {}
        if old then count_excess(old, -1, deltas) end
        count_excess(excess, 1, deltas)
        apply(deltas)
        redis.call('HSET', idlemem_key, owner, excess)
      end
      redis.call('ZADD', idleseen_key, now, owner)
    end
  elseif redis.call('ZSCORE', idleseen_key, owner) then
    -- Unmeasured this time: the last figure stands while the worker beats.
    redis.call('ZADD', idleseen_key, now, owner)
  end
  local silent = redis.call('ZRANGEBYSCORE', workers_key, '-inf', now - 10 * ttl, 'LIMIT', 0, 16)
  for i = 1, #silent do
    redis.call('ZREM', workers_key, silent[i])
    redis.call('HDEL', workerinfo_key, silent[i])
    redis.call('HDEL', gpus_key, silent[i])
    drop_excess(silent[i])
  end
end
-- An idle worker silent for one TTL (dead, or cut off) no longer counts.
local silent_idle = redis.call('ZRANGEBYSCORE', idleseen_key, '-inf', now - ttl, 'LIMIT', 0, 16)
for i = 1, #silent_idle do drop_excess(silent_idle[i]) end

-- HDEL of any number of fields (unpack has a limit on its results).
local function hdel_all(key, fields)
  for i = 1, #fields, 1000 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 999, #fields)))
  end
end

-- Samples nobody has refreshed for 10 TTLs go, with their devices' state
-- (see samples above), judged after this beat's own changes to the idle
-- excess (memory, above).
if sweep then
  local ghosts_key = prefix .. 'ghosts'
  local gone = {}
  for _, d in ipairs(unseen) do
    -- The device's idle bytes once its old ghosts ended: what idle workers
    -- still hold there.
    local f = select(4, parse_memory(d.m))
    if memory[d.uuid] then f = memory[d.uuid][4] end
    local ended, busy = {}, d.n > 0
    for i = 1, #d.rows, 2 do
      local rec = parse_lease(d.rows[i + 1])
      if rec.r == 0 or rec.r >= now - max_age then
        busy = true
      else
        f = f - rec.f
        ended[#ended + 1] = d.rows[i]
      end
    end
    if not busy and f <= 0 then
      redis.call('HDEL', samples_key, d.uuid)
      if #ended > 0 then
        redis.call('DEL', prefix .. 'dev:' .. d.uuid)
        for _, id in ipairs(ended) do redis.call('ZREM', ghosts_key, d.uuid .. '\t' .. id) end
      end
      gone[#gone + 1] = 'm:' .. d.uuid
      gone[#gone + 1] = 'd::' .. d.uuid
      for cls in string.gmatch(st[6] or '', '%S+') do gone[#gone + 1] = 'd:' .. cls .. ':' .. d.uuid end
      memory[d.uuid] = nil
    end
  end
  hdel_all(state_key, gone)
  -- Waiters past their TTL: decisions delete those they read, but one that
  -- stops at a pause or a class cap reads none, and pollers keep coming.
  local ws = redis.call('HGETALL', waiters_key)
  local lapsed = {}
  for i = 1, #ws, 2 do
    local x = tonumber((select(5, waiter_fields(ws[i + 1]))))
    if x == nil or x <= now then lapsed[#lapsed + 1] = ws[i] end
  end
  hdel_all(waiters_key, lapsed)
  redis.call('HSET', state_key, 'swept', now)
end

local pool_epoch = st[7] or ''
local last_id = tonumber(st[8]) or 0
local out = {now, st[4] or ''}
for i = 0, n - 1 do
  local base = 9 + STRIDE * i
  local uuid, id = ARGV[base], ARGV[base + 1]
  local actual = tonumber(ARGV[base + 2])
  local dkey = prefix .. 'dev:' .. uuid
  local member = uuid .. '\t' .. id
  local expires = tonumber(redis.call('ZSCORE', exp_key, member))
  -- Read above; a lease reaped since is out of exp, so not renewed here.
  local raw = expires and expires > now and records[i]
  local status = 0
  if raw then
    local rec = parse_lease(raw)
    if actual >= 0 then
      local m = memory_of(uuid)
      local at = now - tonumber(ARGV[base + 3])
      local idle = tonumber(ARGV[base + 4])
      if idle < 0 then idle = rec.f end
      m[1] = m[1] - math.max(rec.e, rec.a) + math.max(rec.e, actual)
      m[2] = m[2] - rec.a + actual
      if at > m[3] then m[3] = at end
      m[4] = m[4] - rec.f + idle
      rec.a = actual
      rec.at = at
      rec.f = idle
      redis.call('HSET', dkey, id, format_lease(rec))
    end
    local deadline = rec.m
    local short, prio = class_bounds(rec.c)
    if short >= 0 and device_contended(uuid, prio) and (deadline == 0 or rec.s + short < deadline) then
      deadline = rec.s + short
    end
    if deadline > 0 and now >= deadline then
      status = 2
      if deadline ~= rec.m then
        -- max_duration_contended ended it: for good (renewal stops, as at
        -- max_duration, though the waiter may leave), and recorded, so that
        -- reaping counts it as ended by max_duration, not as expired.
        rec.m = deadline
        redis.call('HSET', dkey, id, format_lease(rec))
      end
    else
      status = 1
      expires = now + ttl
      if deadline > 0 and expires > deadline + ttl then expires = deadline + ttl end
      redis.call('ZADD', exp_key, 'XX', expires, member)
    end
  elseif not records[i] and not expires
      and (ARGV[base + 5] ~= pool_epoch or tonumber(id) > last_id) then
    -- Lost with Redis's state (see ARGV above): put back as it was.
    local idle = math.max(0, tonumber(ARGV[base + 4]))
    local rec = {e = tonumber(ARGV[base + 7]), a = math.max(0, actual), at = 0, r = 0,
                 c = ARGV[base + 6], s = tonumber(ARGV[base + 8]), m = tonumber(ARGV[base + 9]),
                 o = ARGV[base + 11], f = idle, t = ARGV[base + 10]}
    if actual >= 0 then rec.at = now - tonumber(ARGV[base + 3]) end
    redis.call('HSET', dkey, id, format_lease(rec))
    local m = memory_of(uuid)
    m[1] = m[1] + math.max(rec.e, rec.a)
    m[2] = m[2] + rec.a
    if rec.at > m[3] then m[3] = rec.at end
    m[4] = m[4] + idle
    redis.call('HINCRBY', state_key, 'n:' .. rec.c, 1)
    redis.call('HINCRBY', state_key, 'd:' .. rec.c .. ':' .. uuid, 1)
    redis.call('HINCRBY', state_key, 'd::' .. uuid, 1)
    expires = now + ttl
    if rec.m > 0 and expires > rec.m + ttl then expires = rec.m + ttl end
    redis.call('ZADD', exp_key, expires, member)
    if expires < next_exp then
      next_exp = expires
      redis.call('HSET', state_key, 'next_exp', string.format('%d', next_exp))
    end
    -- Ids issued from now on stay above it.
    if tonumber(id) > last_id then
      last_id = tonumber(id)
      redis.call('HSET', state_key, 'seq', id)
    end
    -- Other holders may not have renewed yet: nothing is admitted until
    -- they have (a whole TTL, the longest a live lease goes unrenewed),
    -- whoever stored the policy since. Not for one already past its max
    -- duration (ending within this TTL anyway).
    if expires > now and (tonumber(st[9]) or 0) < now + ttl then
      st[9] = now + ttl
      redis.call('HSET', state_key, 'recover', st[9])
    end
    status = 3
  else
    expires = 0
  end
  out[#out + 1] = status
  out[#out + 1] = expires
end
out[#out + 1] = pool_epoch
local fields = {}
for uuid, m in pairs(memory) do
  fields[#fields + 1] = 'm:' .. uuid
  fields[#fields + 1] = format_memory(m[1], m[2], m[3], m[4])
end
if #fields > 0 then redis.call('HSET', state_key, unpack(fields)) end
return out
