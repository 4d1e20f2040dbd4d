-- publish_policy.lua: store the pool's policy, unless it has one already.
--
-- KEYS = [state]
-- ARGV = [prefix, version, mode, clock_ms, policy_doc, classes, pool_record,
--         (class, class_record) * len(classes)]
--   mode: "1" replaces the stored policy (`gpugate policy apply`); "0"
--   publishes into a pool without one, or whose policy is an automatic
--   default; "d" publishes an automatic default (a worker's gate with no
--   policy to give), only into a pool without one: state pauto names it, so
--   that a gate that knew the pool's real policy before Redis lost its state
--   (or was made with one) replaces it, and a pool does not stay uncapped
--   because a policy-less worker came back first. "r" is "0" from a gate
--   that knew the pool's policy before (it restores it): when the pool has
--   none, or only an automatic default, Redis lost its state while leases
--   may be held, and decisions wait out a recovery window (state recover:
--   the script clock until which admit_job.lua DEFERs `recovering`, a lease
--   TTL: the longest a live lease goes unrenewed) in which the holders'
--   heartbeats put their leases back (renew_leases.lua, which also opens
--   the window when it puts one back). Older gates send "0"/"1".
--   A policy stored into a pool without one also starts a new epoch (state
--   epoch, unique per start): leases carry the epoch they were granted in,
--   so a renewal can tell a lease Redis lost from one it ended.
--   clock_ms: 0 = Redis TIME (tests inject a clock)
-- -> {published (1|0), the pool's policy version after the call,
--     "<kind> <class>" for each override in force lifted with its class}
--
-- Key schema: state pversion, pdoc (JSON of Policy.to_dict(), for people and
-- gates), pauto (the version of an automatic default, see mode), epoch, recover
-- (see mode), classes (space-separated names), pool (pool record), c:<class>
-- (class records; formats in the prelude), pause:<class> ("until_ms"),
-- cap:<class> ("n until_ms"; until 0 = no expiry) and ovr (overrides, as
-- set_override.lua writes them), clock (read only). With force "1" the
-- policy replaces the stored one (`gpugate policy apply`); records of classes
-- it drops are deleted, so their requests fail as unknown, and so are their
-- overrides: none is left that nobody could lift, or that would come back
-- with a class of the same name. Only those still in force at the script's
-- now are replied as lifted: one past its expiry had ended already (it stays
-- stored until the next override write), and admit_job.lua ignored it. A
-- policy stored publishes "policy" on P wake: caps, pauses and classes may
-- have changed for any waiter, so every gate wakes all of its own.

local state_key = KEYS[1]
local prefix = ARGV[1]
local version = ARGV[2]
local mode = ARGV[3]
local force = mode == '1'
local restore = mode == 'r'
local clock_ms = tonumber(ARGV[4])
local policy_doc = ARGV[5]
local classes = ARGV[6]
local pool_record = ARGV[7]

local st = redis.call('HMGET', state_key, 'pversion', 'classes', 'ovr', 'clock', 'pauto')
-- An automatic default: pauto names its version (a policy stored over it by
-- an older gate's script, which leaves pauto as it was, is not one).
local auto = st[5] ~= false and st[5] == st[1]
if st[1] and not force and (mode == 'd' or not auto) then return {0, st[1]} end
local reply = {1, version}
local now = script_now(clock_ms, tonumber(st[4]) or 0)
if st[2] then
  local keeps = {}
  for name in string.gmatch(classes, '%S+') do keeps[name] = true end
  local ovr = st[3] and cjson.decode(st[3]) or nil
  local lifted = false
  for old in string.gmatch(st[2], '%S+') do
    redis.call('HDEL', state_key, 'c:' .. old)
    if not keeps[old] then
      for _, kind in ipairs({'pause', 'cap'}) do
        local field = kind .. ':' .. old
        local raw = redis.call('HGET', state_key, field)
        if raw then
          redis.call('HDEL', state_key, field)
          -- pause: "until_ms"; cap: "n until_ms"
          local until_ms = tonumber(string.match(raw, '(%S+)$'))
          if until_ms == 0 or until_ms > now then
            reply[#reply + 1] = kind .. ' ' .. old
          end
        end
        if ovr and ovr[kind] and ovr[kind][old] then
          ovr[kind][old] = nil
          lifted = true
        end
      end
    end
  end
  if lifted then redis.call('HSET', state_key, 'ovr', cjson.encode(ovr)) end
end
local fields = {'pversion', version, 'pdoc', policy_doc, 'classes', classes, 'pool', pool_record}
for i = 8, #ARGV, 2 do
  fields[#fields + 1] = 'c:' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', state_key, unpack(fields))
if mode == 'd' then
  redis.call('HSET', state_key, 'pauto', version)
elseif st[5] then
  redis.call('HDEL', state_key, 'pauto')
end
if not st[1] then
  local t = redis.call('TIME')
  redis.call('HSET', state_key, 'epoch', t[1] .. '.' .. t[2])
end
if restore and (not st[1] or auto) then
  local ttl = tonumber((select(2, pool_fields(pool_record))))
  redis.call('HSET', state_key, 'recover', now + ttl)
end
wake(prefix, 'policy')
return reply
