-- KEYS: record, index. ARGV: lease ms, token, live token ('' if none), pin, scope, fingerprint,
-- margin ms.
local rec, idx = KEYS[1], KEYS[2]
local lease, token = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms(ARGV[4])
local f = fields(rec)
if f[1] == 'f' then
  if tonumber(f[4]) > now or f[2] == ARGV[3] then return reply('rec', now, f) end
  if tonumber(f[2]) >= token then return {'low', f[2]} end
elseif f[1] == 'c' then
  if tonumber(f[5]) > now then return reply('rec', now, f) end
elseif f[1] ~= '' then
  return reply('rec', now, f)
end
redis.call('DEL', rec)
redis.call('HSET', rec, 's', 'f', 't', ARGV[2], 'c', fmt(now), 'd', fmt(now + lease), 'f', ARGV[6])
local px = lease + tonumber(ARGV[7])
redis.call('PEXPIRE', rec, px)
redis.call('SADD', idx, ARGV[5])
keep(idx, px)
return {'claimed'}
