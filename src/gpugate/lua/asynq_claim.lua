-- asynq_claim.lua: take one given pending task as Asynq's dequeue does.
--
-- KEYS = [pending, paused, active, lease]
-- ARGV = [task_id, lease_until_s, task_prefix]
--   lease_until_s: Unix s the lease runs to (Asynq: now + 30 s, whole seconds)
-- -> {"paused"} | {"taken"} | {"claimed", msg}
--    "taken": the tail of pending is no longer task_id (another worker took
--    it, or the queue changed); msg is false when the task hash has none.
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q pending   list    task ids, the tail is the oldest and goes first
--   Q paused    string  exists = paused
--   Q active    list    ids being processed
--   Q lease     zset    id -> lease expiry (Unix s)
--   Q t:<id>    hash    state; pending_since (Unix ns, only while pending); msg
--
-- The writes are those of Asynq's dequeueCmd (internal/rdb/rdb.go, v0.26.0):
-- RPOPLPUSH pending active, state=active, pending_since dropped, the lease
-- entry added. Checking the tail first makes peek-then-claim safe beside Go
-- servers that dequeue the same queue.

local pending_key = KEYS[1]
local paused_key = KEYS[2]
local active_key = KEYS[3]
local lease_key = KEYS[4]

local task_id = ARGV[1]
local lease_until_s = ARGV[2]
local task_prefix = ARGV[3]

if redis.call('EXISTS', paused_key) == 1 then return {'paused'} end
if redis.call('LINDEX', pending_key, -1) ~= task_id then return {'taken'} end
local id = redis.call('RPOPLPUSH', pending_key, active_key)
local task_key = task_prefix .. id
redis.call('HSET', task_key, 'state', 'active')
redis.call('HDEL', task_key, 'pending_since')
redis.call('ZADD', lease_key, lease_until_s, id)
return {'claimed', redis.call('HGET', task_key, 'msg')}
