-- asynq_peek.lua: the oldest pending task of an Asynq queue, without taking it.
--
-- KEYS = [pending, paused]
-- ARGV = [task_prefix]
--   task_prefix: "asynq:{<queue>}:t:"
-- -> {"paused"} | {"empty"} | {"task", id, msg}
--    msg is false when the id has no task hash (nothing Asynq writes).
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q pending   list    task ids; LPUSH on enqueue, the tail is the oldest
--   Q paused    string  exists = paused (Asynq's servers dequeue nothing)
--   Q t:<id>    hash    the task; field msg = protobuf TaskMessage
--
-- Read-only. Reads the task Asynq's dequeueCmd would take next, so a worker
-- can decide whether it fits before claiming it (asynq_claim.lua).

local pending_key = KEYS[1]
local paused_key = KEYS[2]

local task_prefix = ARGV[1]

if redis.call('EXISTS', paused_key) == 1 then return {'paused'} end
local id = redis.call('LINDEX', pending_key, -1)
if not id then return {'empty'} end
return {'task', id, redis.call('HGET', task_prefix .. id, 'msg')}
