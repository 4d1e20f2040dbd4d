-- read_clock.lua: the pool's script clock, as every decision reads it.
--
-- KEYS = [state]
-- ARGV = [clock_ms]   0 = Redis TIME (tests inject a clock)
-- -> now (ms): script_now, the later of TIME and the state's "clock" field
--
-- A gate reads it once, before its first decision, to place its samples on
-- this clock (see "sent_ms" in admit_job.lua); replies keep it up to date
-- after that.

local last = redis.call('HGET', KEYS[1], 'clock')
return script_now(tonumber(ARGV[1]), tonumber(last) or 0)
