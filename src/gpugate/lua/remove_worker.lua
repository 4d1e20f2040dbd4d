-- remove_worker.lua: take a worker out of the pool's registry (Gate.close).
--
-- KEYS = [state, workers, workerinfo, idlemem, idleseen, gpus]
-- ARGV = [owner]
-- -> 1 if the worker was registered, 0 if not (pruned already, or never).
--
-- Key schema: see admit_job.lua and renew_leases.lua. The worker's idle
-- excess leaves the idle sums of the devices' memory records (m:<uuid>) in
-- the same step, so a closed worker never leaves fragmentation behind; its
-- GPU snapshot (gpus[owner]) goes too.

local state_key = KEYS[1]
local workers_key = KEYS[2]
local workerinfo_key = KEYS[3]
local idlemem_key = KEYS[4]
local idleseen_key = KEYS[5]
local gpus_key = KEYS[6]

local owner = ARGV[1]

local old = redis.call('HGET', idlemem_key, owner)
if old then
  local fields = {}
  for uuid, bytes in string.gmatch(old, '(%S+) (%d+)') do
    local field = 'm:' .. uuid
    local r, a, t, f = parse_memory(redis.call('HGET', state_key, field))
    fields[#fields + 1] = field
    fields[#fields + 1] = format_memory(r, a, t, f - tonumber(bytes))
  end
  if #fields > 0 then redis.call('HSET', state_key, unpack(fields)) end
  redis.call('HDEL', idlemem_key, owner)
end
redis.call('ZREM', idleseen_key, owner)
redis.call('HDEL', workerinfo_key, owner)
redis.call('HDEL', gpus_key, owner)
return redis.call('ZREM', workers_key, owner)
