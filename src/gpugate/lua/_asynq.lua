-- _asynq.lua: helpers shared by the Asynq scripts (asynq_*.lua).
-- The loader prepends this file (after _prelude.lua) to every asynq_ script.
--
-- count_day(key, expire_at_s): INCR one of Asynq's daily counters
--   (asynq:{q}:processed:<day> / failed:<day>); on its first increment it
--   expires at expire_at_s (now + 90 days), not refreshed later, as Asynq.
-- count_totals(processed_key, failed_key, max_int64): INCR the all-time
--   totals (failed_key nil: processed only); when processed has reached
--   MaxInt64 both start again at 1. Compared as Lua numbers (doubles), as
--   Asynq compares them.
-- same_attempt(lease_key, task_id, leases): for an attempt's end written
--   again (its first try timed out, and may have run in Redis after all):
--   whether the task's lease is still one this attempt held ("<s> <s>": its
--   last confirmed expiry, and one it tried to set). Another attempt (the
--   task retried and taken again meanwhile) has a lease of its own, and
--   ending that one would run the task twice. nil or "" (a first try, as
--   Asynq writes it): true.
-- pause_owned(paused_value, marker_v, marker_until, pttl): whether the pause
--   of a queue (its paused key's value and PTTL) is gpugate's, by its marker
--   (gpugate:asynq:{<queue>}:pause, fields v and until): the marker's v equals
--   the paused value and the paused key's TTL agrees with the marker (one
--   with an expiry has a TTL, one without has none). A pause lifted and set
--   again by Asynq's tools is a new key with no TTL, so it is never
--   gpugate's and never expires.

local function count_day(key, expire_at_s)
  if redis.call('INCR', key) == 1 then
    redis.call('EXPIREAT', key, expire_at_s)
  end
end

local function same_attempt(lease_key, task_id, leases)
  if leases == nil or leases == '' then return true end
  local score = redis.call('ZSCORE', lease_key, task_id)
  if not score then return false end
  for held in string.gmatch(leases, '%S+') do
    if tonumber(held) == tonumber(score) then return true end
  end
  return false
end

local function count_totals(processed_key, failed_key, max_int64)
  if tonumber(redis.call('GET', processed_key)) == tonumber(max_int64) then
    redis.call('SET', processed_key, 1)
    if failed_key then redis.call('SET', failed_key, 1) end
  else
    redis.call('INCR', processed_key)
    if failed_key then redis.call('INCR', failed_key) end
  end
end

local function pause_owned(paused_value, marker_v, marker_until, pttl)
  if not paused_value or not marker_v or marker_v ~= paused_value then return false end
  if (tonumber(marker_until) or 0) > 0 then return pttl > 0 end
  return pttl == -1
end
