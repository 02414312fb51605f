-- wrk script for bench/: one method and body per run, optional random task ids, and a JSON
-- summary line that bench/common.py parses.
--   WRK_METHOD  GET | POST | PUT ...        (default GET)
--   WRK_BODY    JSON body sent as is         (default none)
--   WRK_ID_MIN, WRK_ID_MAX  if WRK_ID_MAX > 0, "__ID__" in the path becomes a random id in
--               WRK_ID_MIN..WRK_ID_MAX

local method = os.getenv("WRK_METHOD") or "GET"
local body = os.getenv("WRK_BODY") or ""
local id_min = tonumber(os.getenv("WRK_ID_MIN") or "1") or 1
local id_max = tonumber(os.getenv("WRK_ID_MAX") or "0") or 0
local headers = {}
if body ~= "" then
  headers["Content-Type"] = "application/json"
else
  body = nil
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + (seed or 0))
end

function request()
  local path = wrk.path
  if id_max > 0 then
    path = path:gsub("__ID__", tostring(math.random(id_min, id_max)))
  end
  return wrk.format(method, path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, errors,
    latency:percentile(50), latency:percentile(99)))
end
