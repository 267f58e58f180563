-- KEYS: counter. ARGV: block size, floor. Returns the last token of the block.
local n, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('INCRBY', KEYS[1], n)
if v - n < floor then
  v = floor + n
  redis.call('SET', KEYS[1], fmt(v))
end
return fmt(v)
