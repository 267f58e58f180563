-- KEYS: index. ARGV: record-key prefix, channel prefix.
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('DEL', ARGV[1] .. m) == 1 then
    out[#out + 1] = m
    redis.call('PUBLISH', ARGV[2] .. m, 'purged')
  end
end
redis.call('DEL', KEYS[1])
return out
