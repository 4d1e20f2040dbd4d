-- asynq_delete_expired_completed.lua: completed Asynq tasks past retention deleted (the janitor).
--
-- KEYS = [completed]
-- ARGV = [now_s, task_prefix, batch]
--   now_s: whole Unix s; entries scored at or before it are expired;
--   task_prefix: "asynq:{<queue>}:t:"; batch: the most deleted by one call
-- -> how many tasks were deleted (call again until 0)
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q completed   zset   id -> retention expiry (Unix s)
--   Q t:<id>      hash   the task (deleted)
--
-- Asynq's deleteExpiredCompletedTasksCmd (internal/rdb/rdb.go, v0.26.0).

local completed_key = KEYS[1]

local now_s = ARGV[1]
local task_prefix = ARGV[2]
local batch = tonumber(ARGV[3])

local ids = redis.call('ZRANGEBYSCORE', completed_key, '-inf', now_s, 'LIMIT', 0, batch)
for _, id in ipairs(ids) do
  redis.call('DEL', task_prefix .. id)
  redis.call('ZREM', completed_key, id)
end
return #ids
