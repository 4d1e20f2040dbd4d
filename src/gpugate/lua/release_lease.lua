-- release_lease.lua: end a lease its holder (or an operator) gives back.
--
-- KEYS = [state, exp, buckets]
-- ARGV = [prefix, clock_ms, uuid, id, outcome, refund]
--   outcome: "ok" | "error" | "oom" | "dropped" | "expired_by_operator"
--   refund "1" puts the class's token back (an admission left unused).
-- -> 1 if the lease was live and is now released, 0 if it was already gone.
--
-- Key schema and record formats: see admit_job.lua and the prelude. The
-- lease stays as a ghost whose memory counts until a sample taken after now;
-- state counter "out:<class>:<outcome>" counts releases.

local state_key = KEYS[1]
local exp_key = KEYS[2]
local buckets_key = KEYS[3]

local prefix = ARGV[1]
local clock_ms = tonumber(ARGV[2])
local uuid = ARGV[3]
local id = ARGV[4]
local outcome = ARGV[5]
local refund = ARGV[6] == '1'

-- Every read first: on Redis Cluster, while the pool's slot migrates, a key
-- built here (not in KEYS) may already be on the other node, and the script
-- fails there; it must fail before its first write (Redis does not undo
-- them), so the release is sent again whole once the slot has moved.
local raw = redis.call('HGET', prefix .. 'dev:' .. uuid, id)
redis.call('EXISTS', prefix .. 'ghosts')
local last = tonumber(redis.call('HGET', state_key, 'clock')) or 0
local now = script_now(clock_ms, last)
if now > last then redis.call('HSET', state_key, 'clock', now) end
if redis.call('ZREM', exp_key, uuid .. '\t' .. id) == 0 then return 0 end
if not raw then return 0 end
local rec = parse_lease(raw)
end_lease(prefix, state_key, uuid, id, rec, now, 'out:' .. rec.c .. ':' .. outcome)
if refund then
  local b = redis.call('HGET', buckets_key, rec.c)
  local c = redis.call('HGET', state_key, 'c:' .. rec.c)
  if b and c then
    local burst = tonumber((select(5, class_fields(c))))
    local tokens, updated = bucket_fields(b)
    redis.call('HSET', buckets_key, rec.c, format_bucket(math.min(burst, tokens + 1), updated))
  end
end
return 1
