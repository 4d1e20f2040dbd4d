-- asynq_complete.lua: an Asynq task succeeded with a retention: keep it, as MarkAsComplete does.
--
-- KEYS = [active, lease, completed, task, processed_day, processed_total, unique?]
-- ARGV = [task_id, stats_expire_at_s, expire_at_s, msg, max_int64, attempt_leases?]
--   expire_at_s: the completed entry's score (Asynq: now + retention, Unix s);
--   msg: the TaskMessage with completed_at set; stats_expire_at_s: as in
--   asynq_done.lua; unique: the task's uniqueness lock, when it has one
-- -> "OK"; the error "NOT FOUND" when the task is not active and leased, or
--    "INTERNAL" when it is already in the completed zset (Asynq's replies)
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q active, Q lease      list, zset   as in asynq_done.lua
--   Q completed            zset    id -> retention expiry (Unix s); the janitor
--                                  (asynq_delete_expired_completed.lua) deletes it then
--   Q t:<id>               hash    msg, state=completed (result, if written, stays)
--   Q processed:<day>, Q processed, Q unique:<type>:<md5>   as in asynq_done.lua
--
-- Asynq's markAsCompleteCmd / markAsCompleteUniqueCmd (internal/rdb/rdb.go,
-- v0.26.0), in its order: writes before a failed check stay, as in Asynq.

local active_key = KEYS[1]
local lease_key = KEYS[2]
local completed_key = KEYS[3]
local task_key = KEYS[4]
local processed_day_key = KEYS[5]
local processed_total_key = KEYS[6]
local unique_key = KEYS[7]

local task_id = ARGV[1]
local stats_expire_at_s = ARGV[2]
local expire_at_s = ARGV[3]
local msg = ARGV[4]
local max_int64 = ARGV[5]
local attempt_leases = ARGV[6]

-- attempt_leases: an end written again (same_attempt in _asynq.lua).
if not same_attempt(lease_key, task_id, attempt_leases) then return redis.error_reply('NOT FOUND') end
if redis.call('LREM', active_key, 0, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('ZREM', lease_key, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('ZADD', completed_key, expire_at_s, task_id) ~= 1 then
  return redis.error_reply('INTERNAL')
end
redis.call('HSET', task_key, 'msg', msg, 'state', 'completed')
count_day(processed_day_key, stats_expire_at_s)
count_totals(processed_total_key, nil, max_int64)
if unique_key and redis.call('GET', unique_key) == task_id then
  redis.call('DEL', unique_key)
end
return redis.status_reply('OK')
