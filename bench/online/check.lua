-- wrk script: POSTs one request body and checks every response.
-- Arguments (after `--`): path, body file, content type, JSON header length or "-",
-- then one or more markers that every correct response contains.
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local file = assert(io.open(args[2], "rb"))
   local body = file:read("*a")
   file:close()
   local headers = { ["Content-Type"] = args[3] }
   if args[4] ~= "-" then
      headers["Inference-Header-Content-Length"] = args[4]
   end
   markers = {}
   for i = 5, #args do
      table.insert(markers, args[i])
   end
   req = wrk.format("POST", args[1], headers, body)
   checked = 0
   bad = 0
end

function request()
   return req
end

function response(status, headers, body)
   checked = checked + 1
   if status ~= 200 then
      bad = bad + 1
      return
   end
   for _, marker in ipairs(markers) do
      if not string.find(body, marker, 1, true) then
         bad = bad + 1
         return
      end
   end
end

function done(summary, latency, requests)
   local total_checked, total_bad = 0, 0
   for _, thread in ipairs(threads) do
      total_checked = total_checked + thread:get("checked")
      total_bad = total_bad + thread:get("bad")
   end
   local errors = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "checked": %d, ' ..
      '"bad": %d, "socket_errors": %d, "non_2xx": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      total_checked, total_bad, errors.connect + errors.read + errors.write + errors.timeout,
      errors.status))
end
