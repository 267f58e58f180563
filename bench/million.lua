-- million.lua — wrk script for bench/million.sh (store scaling with the number of records).
--
-- usage: wrk -t1 -cC -dD -s million.lua http://127.0.0.1:PORT/pay -- populate N MARKER
--        wrk -t1 -cC -dD -s million.lua http://127.0.0.1:PORT/pay -- replay N [SEED]
--   populate  POST with Idempotency-Key k0 .. k<N-1>, each exactly once, in order. Needs -t1 (the
--             key counter is per thread). Once all N keyed requests are sent, the remaining
--             connections send GET /pay without a key (passthrough, never recorded; the upstream
--             stub answers GET with 200 and keyed POSTs with 201) until the N keyed responses
--             are in, then the thread stops and creates the file MARKER: every key is answered,
--             none is cut off mid-flight. (wrk's main thread still sleeps out -d; million.sh
--             watches for MARKER and sends wrk SIGINT, which makes it print its summary at once.)
--             (wrk's first request() call only verifies the script and is not sent: it gets a GET.)
--   replay    POST with a key drawn uniformly at random from k0 .. k<N-1> (all already recorded,
--             so every request must be a replay). Same body and Content-Type as populate, so the
--             request fingerprint matches. No response() callback: nothing extra on the hot path.
--
-- At the end one tab-separated line is printed:
-- RESULT requests duration_us err_connect err_read err_write err_status err_timeout
--        lat_mean_us p50_us p90_us p99_us p999_us keyed_sent keyed_answered
-- (err_status = responses that were not 2xx/3xx; keyed_* only for populate, per thread 1)

local mode, n, marker = "populate", 1000, nil
sent, answered = 0, 0 -- globals: done() reads them through thread:get()
local calls = 0
local body = '{"amount":100,"currency":"EUR","note":"million"}'
local hdrs = { ["Content-Type"] = "application/json" }
local get_req

function init(args)
  mode = args[1] or "populate"
  n = tonumber(args[2] or "1000")
  if mode ~= "populate" and mode ~= "replay" then
    error("million.lua: unknown MODE " .. tostring(mode))
  end
  if mode == "populate" then
    marker = args[3]
  else
    math.randomseed(tonumber(args[3] or "12345"))
  end
  get_req = wrk.format("GET", nil, {}, nil)
  if mode == "replay" then
    response = nil -- keep the replay hot path free of Lua response parsing
  end
end

function request()
  if mode == "replay" then
    hdrs["Idempotency-Key"] = "k" .. math.random(0, n - 1)
    return wrk.format("POST", nil, hdrs, body)
  end
  calls = calls + 1
  -- wrk 4 calls request() once before the run to check the script (script_verify_request);
  -- that request is never sent, so the first call must not use up a key
  if calls == 1 or sent >= n then
    return get_req
  end
  hdrs["Idempotency-Key"] = "k" .. sent
  sent = sent + 1
  return wrk.format("POST", nil, hdrs, body)
end

function response(status, headers, rbody)
  -- populate only: the GET filler is answered 200 by the stub; any other status belongs to a
  -- keyed POST (201 normally; an error status still means that key's request is over)
  if status ~= 200 then
    answered = answered + 1
    if answered == n then
      if marker then
        local f = io.open(marker, "w")
        if f then f:write("done\n"); f:close() end
      end
      wrk.thread:stop()
    end
  end
end

-- wrk calls setup/done in the main state; sent/answered live in the thread state, so fetch them
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local e = summary.errors
  local s, a = 0, 0
  for _, t in ipairs(threads) do
    s = s + (t:get("sent") or 0)
    a = a + (t:get("answered") or 0)
  end
  io.write(string.format(
    "RESULT\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.1f\t%d\t%d\t%d\t%d\t%d\t%d\n",
    summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), s, a))
end
