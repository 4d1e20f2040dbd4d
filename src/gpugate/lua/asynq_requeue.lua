-- asynq_requeue.lua: an active Asynq task back to the head of pending, as Asynq's shutdown does.
--
-- KEYS = [active, lease, pending, task]
-- ARGV = [task_id]
-- -> "OK", or the error "NOT FOUND" when the task is not active and leased
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q active    list    ids being processed
--   Q lease     zset    id -> lease expiry
--   Q pending   list    task ids; RPUSH puts this one at the tail, taken next
--   Q t:<id>    hash    state=pending
--
-- Asynq's requeueCmd (internal/rdb/rdb.go, v0.26.0): retried, the counters
-- and the message stay as they are, and pending_since is not written back,
-- so the queue's latency reads 0 while this task is the oldest (as in Asynq).

local active_key = KEYS[1]
local lease_key = KEYS[2]
local pending_key = KEYS[3]
local task_key = KEYS[4]

local task_id = ARGV[1]

if redis.call('LREM', active_key, 0, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('ZREM', lease_key, task_id) == 0 then return redis.error_reply('NOT FOUND') end
redis.call('RPUSH', pending_key, task_id)
redis.call('HSET', task_key, 'state', 'pending')
return redis.status_reply('OK')
