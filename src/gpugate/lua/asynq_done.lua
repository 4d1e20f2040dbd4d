-- asynq_done.lua: an Asynq task succeeded with no retention: delete it, as Asynq's Done does.
--
-- KEYS = [active, lease, task, processed_day, processed_total, unique?]
-- ARGV = [task_id, stats_expire_at_s, max_int64, attempt_leases?]
--   stats_expire_at_s: Unix s the daily counter expires at if this creates it
--   (Asynq: now + 90 days); unique: the task's uniqueness lock, when it has one
-- -> "OK", or the error "NOT FOUND" when the task is not active and leased
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q active               list    ids being processed
--   Q lease                zset    id -> lease expiry
--   Q t:<id>               hash    the task (deleted)
--   Q processed:<day>      string  attempts finished that UTC day
--   Q processed            string  all-time attempts finished; back to 1 at max_int64
--   Q unique:<type>:<md5>  string  the uniqueness lock; value = the task id holding it
--
-- Asynq's doneCmd / doneUniqueCmd (internal/rdb/rdb.go, v0.26.0), step by
-- step and in its order, NOT FOUND included: like Asynq, a NOT FOUND after
-- the first check keeps the writes before it (a task whose hash is gone
-- still leaves active and lease). The lock is deleted only while this task
-- holds it.

local active_key = KEYS[1]
local lease_key = KEYS[2]
local task_key = KEYS[3]
local processed_day_key = KEYS[4]
local processed_total_key = KEYS[5]
local unique_key = KEYS[6]

local task_id = ARGV[1]
local stats_expire_at_s = ARGV[2]
local max_int64 = ARGV[3]
local attempt_leases = ARGV[4]

-- attempt_leases: an end written again (same_attempt in _asynq.lua).
if not same_attempt(lease_key, task_id, attempt_leases) then return redis.error_reply('NOT FOUND') end
if redis.call('LREM', active_key, 0, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('ZREM', lease_key, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('DEL', task_key) == 0 then return redis.error_reply('NOT FOUND') end
count_day(processed_day_key, stats_expire_at_s)
count_totals(processed_total_key, nil, max_int64)
if unique_key and redis.call('GET', unique_key) == task_id then
  redis.call('DEL', unique_key)
end
return redis.status_reply('OK')
