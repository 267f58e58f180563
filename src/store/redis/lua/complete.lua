-- KEYS: record, index. ARGV: token, ttl ms, pin, response, scope, channel.
local f = redis.call('HMGET', KEYS[1], 's', 't')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
local ttl = math.max(tonumber(ARGV[2]), 1)
redis.call('HDEL', KEYS[1], 'd')
redis.call('HSET', KEYS[1], 's', 'c', 'e', fmt(now_ms(ARGV[3]) + ttl), 'r', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], ARGV[5])
keep(KEYS[2], ttl)
redis.call('PUBLISH', ARGV[6], 'completed')
return 1
