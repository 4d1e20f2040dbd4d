-- asynq_extend_lease.lua: extend the leases of active Asynq tasks, as Asynq's heartbeat does.
--
-- KEYS = [lease]
-- ARGV = [lease_until_s, id...]
--   lease_until_s: the new lease expiry (Unix s; Asynq: now + 30 s)
-- -> the ids whose lease entry existed, now scored lease_until_s
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q lease   zset   id -> lease expiry (Unix s)
--
-- Asynq's ExtendLease is ZADD XX (no GT, so a smaller score shortens the
-- lease): an id whose entry is gone (a recoverer took the task) is not
-- added back. The ids extended tell the worker which leases it still holds.

local lease_key = KEYS[1]

local lease_until_s = ARGV[1]

local extended = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', lease_key, id) then
    redis.call('ZADD', lease_key, 'XX', lease_until_s, id)
    extended[#extended + 1] = id
  end
end
return extended
