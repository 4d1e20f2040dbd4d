-- asynq_archive.lua: an Asynq task out of retries to the archive, trimmed, as Asynq's Archive does.
--
-- KEYS = [task, active, lease, archived, processed_day, failed_day, processed_total, failed_total]
-- ARGV = [task_id, msg, died_at_s, cutoff_s, max_size, stats_expire_at_s, max_int64, task_prefix,
--         attempt_leases?]
--   msg: the TaskMessage with error_msg and last_failed_at (retried as it
--   was); died_at_s: the archived entry's score (Unix s); cutoff_s: entries
--   scored at or before it are deleted (Asynq: now - 90 days); max_size:
--   Asynq's 10000; task_prefix: "asynq:{<queue>}:t:", for the hashes of
--   trimmed tasks
-- -> "OK", or the error "NOT FOUND" when the task is not active and leased
--
-- Key schema (Q = asynq:{<queue>}:):
--   Q t:<id>              hash    msg, state=archived; trimmed tasks' hashes deleted
--   Q active              list    ids being processed
--   Q lease               zset    id -> lease expiry
--   Q archived            zset    id -> time archived (Unix s)
--   Q processed:<day>, Q failed:<day>, Q processed, Q failed   as in asynq_retry.lua
--
-- Asynq's archiveCmd (internal/rdb/rdb.go, v0.26.0), in its order and with
-- its trim: after adding, entries at or before cutoff_s go, then ZRANGE
-- 0 -max_size, which leaves max_size - 1 entries (9999) once the archive
-- reaches max_size. Asynq's ZRANGE ... BYSCORE is ZRANGEBYSCORE here (same
-- result, and it runs on Redis before 6.2); removals go in chunks so a
-- long trim stays under Lua's unpack limit.

local task_key = KEYS[1]
local active_key = KEYS[2]
local lease_key = KEYS[3]
local archived_key = KEYS[4]
local processed_day_key = KEYS[5]
local failed_day_key = KEYS[6]
local processed_total_key = KEYS[7]
local failed_total_key = KEYS[8]

local task_id = ARGV[1]
local msg = ARGV[2]
local died_at_s = ARGV[3]
local cutoff_s = ARGV[4]
local max_size = tonumber(ARGV[5])
local stats_expire_at_s = ARGV[6]
local max_int64 = ARGV[7]
local task_prefix = ARGV[8]
local attempt_leases = ARGV[9]

local CHUNK = 1000

local function drop(ids)
  for i = 1, #ids, CHUNK do
    local part = {}
    for j = i, math.min(i + CHUNK - 1, #ids) do
      redis.call('DEL', task_prefix .. ids[j])
      part[#part + 1] = ids[j]
    end
    redis.call('ZREM', archived_key, unpack(part))
  end
end

-- attempt_leases: an end written again (same_attempt in _asynq.lua).
if not same_attempt(lease_key, task_id, attempt_leases) then return redis.error_reply('NOT FOUND') end
if redis.call('LREM', active_key, 0, task_id) == 0 then return redis.error_reply('NOT FOUND') end
if redis.call('ZREM', lease_key, task_id) == 0 then return redis.error_reply('NOT FOUND') end
redis.call('ZADD', archived_key, died_at_s, task_id)
drop(redis.call('ZRANGEBYSCORE', archived_key, '-inf', cutoff_s))
drop(redis.call('ZRANGE', archived_key, 0, -max_size))
redis.call('HSET', task_key, 'msg', msg, 'state', 'archived')
count_day(processed_day_key, stats_expire_at_s)
count_day(failed_day_key, stats_expire_at_s)
count_totals(processed_total_key, failed_total_key, max_int64)
return redis.status_reply('OK')
