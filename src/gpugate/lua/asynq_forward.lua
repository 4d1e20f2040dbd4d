-- asynq_forward.lua: due scheduled or retry Asynq tasks to pending, as Asynq's forwarder does.
--
-- KEYS = [source, pending]
-- ARGV = [now_s, task_prefix, now_ns, group_prefix]
--   source: Q scheduled or Q retry; now_s: whole Unix s (entries scored at
--   or before it are due); now_ns: the pending_since written; task_prefix:
--   "asynq:{<queue>}:t:"; group_prefix: "asynq:{<queue>}:g:"
-- -> how many tasks moved (at most 100; call again until 0)
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q scheduled, Q retry   zset    id -> when due (Unix s)
--   Q pending              list    task ids; LPUSH joins at the head (taken last)
--   Q t:<id>               hash    state=pending, pending_since (Unix ns); or,
--                                  with a group field, state=aggregating
--   Q g:<group>            zset    id -> time added (Unix s)
--
-- Asynq's forwardCmd (internal/rdb/rdb.go, v0.26.0): batches of 100 keep
-- each script short. The paused key does not matter: Asynq forwards into a
-- paused queue too.

local source_key = KEYS[1]
local pending_key = KEYS[2]

local now_s = ARGV[1]
local task_prefix = ARGV[2]
local now_ns = ARGV[3]
local group_prefix = ARGV[4]

local ids = redis.call('ZRANGEBYSCORE', source_key, '-inf', now_s, 'LIMIT', 0, 100)
for _, id in ipairs(ids) do
  local task_key = task_prefix .. id
  local group = redis.call('HGET', task_key, 'group')
  if group and group ~= '' then
    redis.call('ZADD', group_prefix .. group, now_s, id)
    redis.call('ZREM', source_key, id)
    redis.call('HSET', task_key, 'state', 'aggregating')
  else
    redis.call('LPUSH', pending_key, id)
    redis.call('ZREM', source_key, id)
    redis.call('HSET', task_key, 'state', 'pending', 'pending_since', now_ns)
  end
end
return #ids
