-- publish_policy.lua: store the pool's policy, unless it has one already.
--
-- KEYS = [state]
-- ARGV = [version, force, policy_doc, classes, pool_record,
--         (class, class_record) * len(classes)]
-- -> {published (1|0), the pool's policy version after the call,
--     "<kind> <class>" for each override lifted with its class}
--
-- Key schema: state pversion, pdoc (JSON of Policy.to_dict(), for people and
-- gates), classes (space-separated names), pool (pool record), c:<class>
-- (class records; formats in the prelude), pause:<class>, cap:<class> and
-- ovr (overrides, as set_override.lua writes them). With force "1" the
-- policy replaces the stored one (`gpugate policy apply`); records of classes
-- it drops are deleted, so their requests fail as unknown, and so are their
-- overrides: none is left that nobody could lift, or that would come back
-- with a class of the same name.

local state_key = KEYS[1]
local version = ARGV[1]
local force = ARGV[2] == '1'
local policy_doc = ARGV[3]
local classes = ARGV[4]
local pool_record = ARGV[5]

local st = redis.call('HMGET', state_key, 'pversion', 'classes', 'ovr')
if st[1] and not force then return {0, st[1]} end
local reply = {1, version}
if st[2] then
  local keeps = {}
  for name in string.gmatch(classes, '%S+') do keeps[name] = true end
  local ovr = st[3] and cjson.decode(st[3]) or nil
  local lifted = false
  for old in string.gmatch(st[2], '%S+') do
    redis.call('HDEL', state_key, 'c:' .. old)
    if not keeps[old] then
      for _, kind in ipairs({'pause', 'cap'}) do
        if redis.call('HDEL', state_key, kind .. ':' .. old) == 1 then
          reply[#reply + 1] = kind .. ' ' .. old
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
for i = 6, #ARGV, 2 do
  fields[#fields + 1] = 'c:' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', state_key, unpack(fields))
return reply
