-- KEYS: index. ARGV: pin, record-key prefix (the record key is prefix .. scope).
local out = {fmt(now_ms(ARGV[1]))}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = fields(ARGV[2] .. m)
  if f[1] == '' then
    redis.call('SREM', KEYS[1], m)
  else
    out[#out + 1] = m
    for i = 1, 7 do out[#out + 1] = f[i] end
  end
end
return out
