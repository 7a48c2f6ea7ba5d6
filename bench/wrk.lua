-- wrk script of the benchmark: POST the body in $BENCH_BODY (a chat completion request), with
-- "Authorization: Bearer $BENCH_KEY" when that is set; with $BENCH_DELAY_MS > 0 each connection waits that long
-- on average (uniformly 0 to twice that) after an answer before its next request (a paced load, below saturation);
-- at the end print one line
-- "BENCH_RESULT {json}" with the counts, the errors (socket errors and non-2xx answers) and the latency
-- percentiles (microseconds).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if pace > 0 then
  -- uniform in [0, 2 x pace): the connections' requests spread out instead of arriving in waves
  function delay()
    return math.random() * 2 * pace
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
