-- publish_policy.lua: store the pool's policy, unless it has one already.
--
-- KEYS = [state]
-- ARGV = [version, force, policy_doc, classes, pool_record,
--         (class, class_record) * len(classes)]
-- -> {published (1|0), the pool's policy version after the call}
--
-- Key schema: state pversion, pdoc (JSON of Policy.to_dict(), for people and
-- gates), classes (space-separated names), pool (pool record), c:<class>
-- (class records; formats in the prelude). With force "1" the policy
-- replaces the stored one (`gpugate policy apply`); records of classes it
-- drops are deleted, so their requests fail as unknown.

local state_key = KEYS[1]
local version = ARGV[1]
local force = ARGV[2] == '1'
local policy_doc = ARGV[3]
local classes = ARGV[4]
local pool_record = ARGV[5]

local st = redis.call('HMGET', state_key, 'pversion', 'classes')
if st[1] and not force then return {0, st[1]} end
if st[2] then
  for old in string.gmatch(st[2], '%S+') do redis.call('HDEL', state_key, 'c:' .. old) end
end
local fields = {'pversion', version, 'pdoc', policy_doc, 'classes', classes, 'pool', pool_record}
for i = 6, #ARGV, 2 do
  fields[#fields + 1] = 'c:' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', state_key, unpack(fields))
return {1, version}
