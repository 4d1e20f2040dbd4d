-- set_override.lua: set or clear a runtime pause or cap of one class.
--
-- KEYS = [state]
-- ARGV = [prefix, clock_ms, kind, class, n, for_ms, who, why]
--   kind: "pause" | "cap" | "resume" (clears a pause) | "uncap" (clears a cap)
--   n: the cap (kind "cap"); for_ms: how long it lasts, 0 = until cleared
-- -> JSON of every override still in force, {"pause": {class: {until, who,
--    why, at, since}}, "cap": {class: {n, until, who, why, at, since}}}: at
--    = when it was last set (ms), since = when it came into force: setting
--    an override still in force again (a pause extended, a cap changed)
--    keeps its since; one lifted or expired starts afresh (entries written
--    before since existed read at for it).
--    Error replies "nopolicy", "unknown_class <name>" (a class the policy
--    does not have, unless lifting an override of it that is still stored).
--
-- Key schema: state pause:<class> = "until_ms", cap:<class> = "n until_ms"
-- (what admit_job.lua reads; until 0 = no expiry), ovr = the JSON above (for
-- status: who, why, when). An override past its expiry is ignored by
-- admit_job.lua and dropped here.

local state_key = KEYS[1]

local prefix = ARGV[1]
local clock_ms = tonumber(ARGV[2])
local kind = ARGV[3]
local cls = ARGV[4]
local n = tonumber(ARGV[5])
local for_ms = tonumber(ARGV[6])
local who = ARGV[7]
local why = ARGV[8]

local st = redis.call('HMGET', state_key, 'clock', 'pool', 'c:' .. cls, 'ovr')
local last = tonumber(st[1]) or 0
local now = script_now(clock_ms, last)
if now > last then redis.call('HSET', state_key, 'clock', now) end
if not st[2] then return redis.error_reply('nopolicy') end
if not st[3] then
  -- A class the policy no longer has: only an override of it still stored
  -- (written before its class was dropped) may be lifted.
  local field = ({resume = 'pause:', uncap = 'cap:'})[kind]
  if not field or redis.call('HEXISTS', state_key, field .. cls) == 0 then
    return redis.error_reply('unknown_class ' .. cls)
  end
end

local ovr = {pause = {}, cap = {}}
if st[4] then ovr = cjson.decode(st[4]) end
for _, section in ipairs({'pause', 'cap'}) do
  local kept = {}
  for c, o in pairs(ovr[section] or {}) do
    if o['until'] == 0 or o['until'] > now then
      kept[c] = o
    else
      redis.call('HDEL', state_key, section .. ':' .. c)
    end
  end
  ovr[section] = kept
end

local until_ms = 0
if for_ms > 0 then until_ms = now + for_ms end
-- Only overrides in force are left in ovr: one set again keeps when it began.
local function since_of(prev)
  if prev then return prev.since or prev.at or now end
  return now
end
if kind == 'pause' then
  local since = since_of(ovr.pause[cls])
  ovr.pause[cls] = {['until'] = until_ms, who = who, why = why, at = now, since = since}
  redis.call('HSET', state_key, 'pause:' .. cls, string.format('%d', until_ms))
elseif kind == 'cap' then
  local since = since_of(ovr.cap[cls])
  ovr.cap[cls] = {n = n, ['until'] = until_ms, who = who, why = why, at = now, since = since}
  redis.call('HSET', state_key, 'cap:' .. cls, string.format('%d %d', n, until_ms))
elseif kind == 'resume' then
  ovr.pause[cls] = nil
  redis.call('HDEL', state_key, 'pause:' .. cls)
elseif kind == 'uncap' then
  ovr.cap[cls] = nil
  redis.call('HDEL', state_key, 'cap:' .. cls)
else
  return redis.error_reply('unknown override kind ' .. kind)
end
local encoded = cjson.encode(ovr)
redis.call('HSET', state_key, 'ovr', encoded)
wake(prefix, 'override')
return encoded
