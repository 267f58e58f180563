-- Helpers shared by the scripts. `now_ms(pin)`: the server's clock in unix ms, unless the caller pins
-- the time (tests only; the proxy never does).
local function now_ms(pin)
  if pin ~= '' then return tonumber(pin) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%d', n) end
local function keep(k, px)
  if redis.call('PTTL', k) < px then redis.call('PEXPIRE', k, px) end
end
local function fields(k)
  local f = redis.call('HMGET', k, 's', 't', 'c', 'd', 'e', 'f', 'r')
  for i = 1, 7 do f[i] = f[i] or '' end
  return f
end
local function reply(head, now, f)
  local out = {head, fmt(now)}
  for i = 1, 7 do out[#out + 1] = f[i] end
  return out
end
