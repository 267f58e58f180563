-- KEYS: record, index. ARGV: token, lease ms, pin, margin ms.
local f = redis.call('HMGET', KEYS[1], 's', 't')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
local lease = tonumber(ARGV[2])
local px = lease + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'd', fmt(now_ms(ARGV[3]) + lease))
redis.call('PEXPIRE', KEYS[1], px)
keep(KEYS[2], px)
return 1
