-- asynq_read_queue.lua: one Asynq queue's sizes, counters, latency and pause, atomically.
--
-- KEYS = [pending, active, scheduled, retry, archived, completed,
--         processed_total, failed_total, paused, groups, marker]
-- ARGV = [queue_prefix, clock_ms]
--   queue_prefix: "asynq:{<queue>}:"; clock_ms: 0 = Redis TIME (tests inject a clock)
-- -> {now_ms, day, pending, active, scheduled, retry, archived, completed,
--     processed_today, failed_today, processed_total, failed_total,
--     processed_yesterday, oldest_pending_since, groups, aggregating,
--     paused_value, paused_pttl_ms, pause_owned (1: the pause is gpugate's,
--     pause_owned in _asynq.lua; 0: it is not, or the queue is not paused),
--     marker_v, marker_until, marker_who, marker_why, marker_at, marker_pool, marker_cls}
--    Counters and oldest_pending_since are returned as stored (strings; nil
--    when absent): pending_since is Unix ns, beyond a Lua number's precision.
--
-- Key schema (Q = queue_prefix; see gpugate/asynq/_keys.py):
--   Q pending           list    task ids, the tail (LRANGE -1 -1) is the oldest
--   Q active            list    ids being processed
--   Q scheduled, Q retry, Q archived, Q completed    zsets of ids
--   Q t:<id>            hash    the task; field pending_since = Unix ns
--   Q processed:<day>, Q failed:<day>    daily counters (UTC day YYYY-MM-DD)
--   Q processed, Q failed                all-time counters
--   Q paused            string  exists = paused, value = Unix s of the pause
--   Q groups            set     group names; Q g:<group> zset of tasks
--   marker              hash    gpugate's pause: v until who why at pool cls
--
-- This is what Asynq's currentStatsCmd (internal/rdb/inspect.go) computes,
-- in one script for the same reason: the oldest pending id and its
-- pending_since must be read at the same instant, or a task dequeued in
-- between would read as latency 0. The daily counters use the UTC day of
-- the script's clock (Asynq uses the inspecting client's clock).

local pending_key = KEYS[1]
local active_key = KEYS[2]
local scheduled_key = KEYS[3]
local retry_key = KEYS[4]
local archived_key = KEYS[5]
local completed_key = KEYS[6]
local processed_total_key = KEYS[7]
local failed_total_key = KEYS[8]
local paused_key = KEYS[9]
local groups_key = KEYS[10]
local marker_key = KEYS[11]

local prefix = ARGV[1]
local clock_ms = tonumber(ARGV[2])

-- The proleptic Gregorian date of a day number (days since 1970-01-01),
-- by Howard Hinnant's civil_from_days.
local function civil_day(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end

local now = script_now(clock_ms, 0)
local today = math.floor(now / 86400000)
local day = civil_day(today)
local yesterday = civil_day(today - 1)

local pending = redis.call('LLEN', pending_key)
local oldest = false
if pending > 0 then
  local id = redis.call('LRANGE', pending_key, -1, -1)[1]
  if id then oldest = redis.call('HGET', prefix .. 't:' .. id, 'pending_since') end
end

local group_names = redis.call('SMEMBERS', groups_key)
local aggregating = 0
for _, name in ipairs(group_names) do
  aggregating = aggregating + redis.call('ZCARD', prefix .. 'g:' .. name)
end

local marker = redis.call('HMGET', marker_key, 'v', 'until', 'who', 'why', 'at', 'pool', 'cls')
local paused_value = redis.call('GET', paused_key)
local paused_pttl = redis.call('PTTL', paused_key)
local owned = pause_owned(paused_value, marker[1], marker[2], paused_pttl) and 1 or 0

return {
  now, day,
  pending,
  redis.call('LLEN', active_key),
  redis.call('ZCARD', scheduled_key),
  redis.call('ZCARD', retry_key),
  redis.call('ZCARD', archived_key),
  redis.call('ZCARD', completed_key),
  redis.call('GET', prefix .. 'processed:' .. day),
  redis.call('GET', prefix .. 'failed:' .. day),
  redis.call('GET', processed_total_key),
  redis.call('GET', failed_total_key),
  redis.call('GET', prefix .. 'processed:' .. yesterday),
  oldest,
  #group_names,
  aggregating,
  paused_value,
  paused_pttl,
  owned,
  marker[1], marker[2], marker[3], marker[4], marker[5], marker[6], marker[7],
}
