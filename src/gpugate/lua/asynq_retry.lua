-- asynq_retry.lua: an attempt of an Asynq task failed: schedule it again, as Asynq's Retry does.
--
-- KEYS = [task, active, lease, retry, processed_day, failed_day, processed_total, failed_total]
-- ARGV = [task_id, msg, retry_at_s, stats_expire_at_s, is_failure, max_int64,
--         attempt_leases?]
--   msg: the TaskMessage with error_msg, last_failed_at and (a failure only)
--   retried + 1; retry_at_s: the retry entry's score (Unix s);
--   stats_expire_at_s: Unix s a daily counter this creates expires at
--   (Asynq: now + 90 days); is_failure: "1" counts the attempt, "0" not
-- -> "OK", or the error "NOT FOUND" when the task is not active and leased
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q t:<id>              hash    msg, state=retry
--   Q active              list    ids being processed
--   Q lease               zset    id -> lease expiry
--   Q retry               zset    id -> retry time (Unix s); the forwarder
--                                 (asynq_forward.lua) moves it back to pending
--   Q processed:<day>, Q failed:<day>   strings: attempts finished / failed
--                                       that UTC day, expiring 90 days on
--   Q processed, Q failed               strings: all-time counts; both back
--                                       to 1 when processed reaches max_int64
--
-- Asynq's retryCmd (internal/rdb/rdb.go, v0.26.0), in its order: a NOT FOUND
-- from the lease check keeps the LREM before it, as in Asynq. A non-failure
-- (Asynq's IsFailure false, e.g. a rate limit) still rewrites msg but counts
-- nothing.

local task_key = KEYS[1]
local active_key = KEYS[2]
local lease_key = KEYS[3]
local retry_key = KEYS[4]
local processed_day_key = KEYS[5]
local failed_day_key = KEYS[6]
local processed_total_key = KEYS[7]
local failed_total_key = KEYS[8]

local task_id = ARGV[1]
local msg = ARGV[2]
local retry_at_s = ARGV[3]
local stats_expire_at_s = ARGV[4]
local is_failure = ARGV[5] == '1'
local max_int64 = ARGV[6]
local attempt_leases = ARGV[7]

-- attempt_leases: an end written again (same_attempt in _asynq.lua).
if not same_attempt(lease_key, task_id, attempt_leases) then return redis.error_reply('NOT FOUND') end
if redis.call('LREM', active_key, 0, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('ZREM', lease_key, task_id) == 0 then return redis.error_reply('NOT FOUND') end
redis.call('ZADD', retry_key, retry_at_s, task_id)
redis.call('HSET', task_key, 'msg', msg, 'state', 'retry')
if is_failure then
  count_day(processed_day_key, stats_expire_at_s)
  count_day(failed_day_key, stats_expire_at_s)
  count_totals(processed_total_key, failed_total_key, max_int64)
end
return redis.status_reply('OK')
