-- asynq_pause_queue.lua: pause an Asynq queue as Asynq does, owned by gpugate, with an optional expiry.
--
-- KEYS = [paused, marker]
-- ARGV = [clock_ms, for_ms, who, why, pool, cls]
--   clock_ms: 0 = Redis TIME; for_ms: how long the pause lasts, 0 = until unpaused
-- -> {outcome, paused_value, until_ms, now_ms}
--   outcome "paused": the queue was not paused and now is (gpugate's pause);
--   "extended": it was gpugate's pause, now with this expiry, who and why;
--   "already_paused": someone else paused it (AsynqMon, `asynq queue pause`):
--   nothing changed, and gpugate will never unpause it by itself.
--
-- Key schema:
--   paused  string  asynq:{<queue>}:paused, Unix s of the pause. Asynq's
--                   PauseQueue does SETNX with no TTL; so does this script
--                   without for_ms. With for_ms the key gets that TTL, so
--                   Redis itself ends the pause on time (Asynq servers check
--                   EXISTS before each dequeue) with no gpugate process running.
--   marker  hash    gpugate:asynq:{<queue>}:pause: v (the paused value gpugate
--                   wrote), until (ms, 0 = none), who, why, at (ms), pool,
--                   cls; same TTL as the paused key.
--
-- Ownership: pause_owned (_asynq.lua).

local paused_key = KEYS[1]
local marker_key = KEYS[2]

local clock_ms = tonumber(ARGV[1])
local for_ms = tonumber(ARGV[2])
local who = ARGV[3]
local why = ARGV[4]
local pool = ARGV[5]
local cls = ARGV[6]

local now = script_now(clock_ms, 0)
local until_ms = 0
if for_ms > 0 then until_ms = now + for_ms end

local current = redis.call('GET', paused_key)
local mark = redis.call('HMGET', marker_key, 'v', 'until')
local pttl = redis.call('PTTL', paused_key)

local function write_marker(value)
  redis.call('DEL', marker_key)
  redis.call('HSET', marker_key, 'v', value, 'until', string.format('%d', until_ms),
    'who', who, 'why', why, 'at', string.format('%d', now), 'pool', pool, 'cls', cls)
  if for_ms > 0 then
    redis.call('PEXPIRE', paused_key, for_ms)
    redis.call('PEXPIRE', marker_key, for_ms)
  else
    redis.call('PERSIST', paused_key)
  end
end

if not current then
  local value = string.format('%d', math.floor(now / 1000))
  redis.call('SET', paused_key, value, 'NX')
  write_marker(value)
  return {'paused', value, until_ms, now}
end
if pause_owned(current, mark[1], mark[2], pttl) then
  write_marker(current)
  return {'extended', current, until_ms, now}
end
-- A marker left from a pause that is no longer gpugate's describes nothing.
if mark[1] then redis.call('DEL', marker_key) end
return {'already_paused', current, 0, now}
