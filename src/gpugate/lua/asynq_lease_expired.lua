-- asynq_lease_expired.lua: active Asynq tasks whose lease ran out, as Asynq's recoverer lists them.
--
-- KEYS = [lease]
-- ARGV = [cutoff_s, task_prefix]
--   cutoff_s: whole Unix s; leases scored at or before it are expired (the
--   recoverer passes now - 30 s); task_prefix: "asynq:{<queue>}:t:"
-- -> the msg of each such task, by lease expiry; ids without a hash are skipped
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q lease     zset   id -> lease expiry (Unix s)
--   Q t:<id>    hash   field msg = protobuf TaskMessage
--
-- Asynq's listLeaseExpiredCmd (internal/rdb/rdb.go, v0.26.0). Read-only: the
-- caller moves each task on with asynq_retry.lua or asynq_archive.lua.

local lease_key = KEYS[1]

local cutoff_s = ARGV[1]
local task_prefix = ARGV[2]

local msgs = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', lease_key, '-inf', cutoff_s)) do
  local msg = redis.call('HGET', task_prefix .. id, 'msg')
  if msg then msgs[#msgs + 1] = msg end
end
return msgs
