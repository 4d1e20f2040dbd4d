-- _asynq.lua: helpers shared by the Asynq lifecycle scripts (asynq_*.lua).
-- The loader prepends this file (after _prelude.lua) to every asynq_ script.
--
-- count_day(key, expire_at_s): INCR one of Asynq's daily counters
--   (asynq:{q}:processed:<day> / failed:<day>); on its first increment it
--   expires at expire_at_s (now + 90 days), not refreshed later, as Asynq.
-- count_totals(processed_key, failed_key, max_int64): INCR the all-time
--   totals (failed_key nil: processed only); when processed has reached
--   MaxInt64 both start again at 1. Compared as Lua numbers (doubles), as
--   Asynq compares them.

local function count_day(key, expire_at_s)
  if redis.call('INCR', key) == 1 then
    redis.call('EXPIREAT', key, expire_at_s)
  end
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
