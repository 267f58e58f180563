-- KEYS: record, index. ARGV: token, scope, channel.
local f = redis.call('HMGET', KEYS[1], 's', 't')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'released')
return 1
