-- asynq_unpause_queue.lua: unpause an Asynq queue as Asynq does, or only if the pause is gpugate's.
--
-- KEYS = [paused, marker]
-- ARGV = [only_own]
--   only_own: "1" = lift the pause only if it is gpugate's (pause_owned,
--   _asynq.lua); "0" = lift any pause, as Asynq's
--   UnpauseQueue does (DEL of the paused key)
-- -> {outcome, was_gpugates, paused_value}
--   outcome "unpaused"; "not_paused" (Asynq's UnpauseQueue answers an error
--   here); "not_ours" (only_own and someone else's pause: nothing changed)
--
-- Key schema:
--   paused  string  asynq:{<queue>}:paused (exists = paused)
--   marker  hash    gpugate:asynq:{<queue>}:pause: v until who why at pool cls
--
-- One script because the ownership check and the DEL must see the same key:
-- a pause lifted and set again by Asynq's tools between the two would be lost.

local paused_key = KEYS[1]
local marker_key = KEYS[2]

local only_own = ARGV[1] == '1'

local current = redis.call('GET', paused_key)
local mark = redis.call('HMGET', marker_key, 'v', 'until')
local mine = pause_owned(current, mark[1], mark[2], redis.call('PTTL', paused_key))

if not current then
  redis.call('DEL', marker_key)
  return {'not_paused', 0, false}
end
if only_own and not mine then
  -- A marker left from a pause that is no longer gpugate's describes nothing.
  if mark[1] then redis.call('DEL', marker_key) end
  return {'not_ours', 0, current}
end
redis.call('DEL', paused_key, marker_key)
return {'unpaused', mine and 1 or 0, current}
