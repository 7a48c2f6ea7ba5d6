-- admit.lua: rate limits and budget reservation for one request, all or nothing, in one round trip.
-- KEYS: 1 resv hash, 2 resvexp zset, 3 budget-period hash, 4 rl:r current window, 5 rl:r previous window,
--       6 rl:t current window, 7 rl:t previous window, 8-11 the same four for the key's per-model override
--       (all in the key's slot {k:ID});
--       on a single node only (cross-slot on a cluster, where meter.py pipelines the HSET beside the script):
--       12 the admitting instance's in-flight hash
-- ARGV: 1 gen, 2 now_ms, 3 budget nano (-1 none), 4 reserve nano, 5 period id, 6 reservation ttl ms,
--       7 rpm (-1 none), 8 tpm (-1 none), 9 tokens, 10 window ms, 11 elapsed ms in window, 12 meta, 13 key ttl ms,
--       14 the model override's rpm (-1 none), 15 its tpm (-1 none);
--       with KEYS[12]: 16 the request's in-flight entry (JSON), 17 the in-flight hash's ttl ms
-- With KEYS[12] the request is registered in flight (HSET GEN entry, PEXPIRE) when it is admitted (ok or dup).
-- Returns {status, spent, reserved, r_ok, r_remaining, r_reset_ms, r_retry_ms, t_ok, t_remaining, t_reset_ms,
--          t_retry_ms, then the same eight for the model override}; status is ok | dup (gen already admitted:
--          nothing consumed) | budget | rate.
local resv, resvexp, per = KEYS[1], KEYS[2], KEYS[3]
local gen, now = ARGV[1], tonumber(ARGV[2])
local budget, reserve, period = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local rpm, tpm, tokens = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local w, e = tonumber(ARGV[10]), tonumber(ARGV[11])

-- reservations past their expiry (by the caller's clock) give their budget back
for _, g in ipairs(redis.call('ZRANGEBYSCORE', resvexp, '-inf', now, 'LIMIT', 0, 100)) do
  drop_resv(resv, resvexp, g)
end

local dup = redis.call('HEXISTS', resv, 'g:' .. gen) == 1
local spent = tonumber(redis.call('HGET', per, 'cost') or '0')
local reserved = tonumber(redis.call('HGET', resv, 's:' .. period) or '0')
if budget >= 0 and not dup and spent + reserved + reserve > budget then
  return {'budget', spent, reserved, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0}
end

-- the sliding-window-counter rule; mirrors ratelimit.decide()
local function decide(limit, prevk, currk, cost)
  if limit < 0 then
    return 1, 0, 0, 0
  end
  local prev = tonumber(redis.call('GET', prevk) or '0')
  local curr = tonumber(redis.call('GET', currk) or '0')
  local ok = prev * (w - e) + (curr + cost) * w <= limit * w
  local after = curr
  if ok then after = curr + cost end
  local rem = math.floor(math.max(limit * w - prev * (w - e) - after * w, 0) / w)
  local reset = 0
  if after > 0 then reset = (w - e) + w elseif prev > 0 then reset = w - e end
  local retry = 0
  if not ok then
    if cost > limit then
      retry = -1
    elseif curr + cost <= limit then
      retry = math.max(math.ceil(w - (limit - curr - cost) * w / prev) - e, 1)
    else
      retry = math.max((w - e) + math.ceil(w - (limit - cost) * w / curr), 1)
    end
  end
  if ok then return 1, rem, reset, retry end
  return 0, rem, reset, retry
end

local rcost, tcost = 1, tokens
if dup then rcost, tcost = 0, 0 end
local mrpm, mtpm = tonumber(ARGV[14]), tonumber(ARGV[15])
local rok, rrem, rreset, rretry = decide(rpm, KEYS[5], KEYS[4], rcost)
local tok, trem, treset, tretry = decide(tpm, KEYS[7], KEYS[6], tcost)
local mrok, mrrem, mrreset, mrretry = decide(mrpm, KEYS[9], KEYS[8], rcost)
local mtok, mtrem, mtreset, mtretry = decide(mtpm, KEYS[11], KEYS[10], tcost)
local decisions = {rok, rrem, rreset, rretry, tok, trem, treset, tretry,
                   mrok, mrrem, mrreset, mrretry, mtok, mtrem, mtreset, mtretry}
local function answer(status, res)
  local out = {status, spent, res}
  for _, v in ipairs(decisions) do table.insert(out, v) end
  return out
end
local function register()
  if KEYS[12] then
    redis.call('HSET', KEYS[12], gen, ARGV[16])
    redis.call('PEXPIRE', KEYS[12], ARGV[17])
  end
end
if dup then
  register()
  return answer('dup', reserved)
end
if rok == 0 or tok == 0 or mrok == 0 or mtok == 0 then
  return answer('rate', reserved)
end

local rl_ttl = s(2 * w + 1000)
-- count this request in each window that has a limit (the key's own, and its override for this model)
local function charge(limit, window, by)
  if limit >= 0 then
    redis.call('INCRBY', window, by)
    redis.call('PEXPIRE', window, rl_ttl)
  end
end
charge(rpm, KEYS[4], 1)
charge(tpm, KEYS[6], ARGV[9])
charge(mrpm, KEYS[8], 1)
charge(mtpm, KEYS[10], ARGV[9])
redis.call('HSET', resv, 'g:' .. gen, ARGV[4] .. '|' .. ARGV[9] .. '|' .. period .. '|' .. ARGV[12])
redis.call('HINCRBY', resv, 's:' .. period, ARGV[4])
redis.call('ZADD', resvexp, s(now + tonumber(ARGV[6])), gen)
redis.call('PEXPIRE', resv, ARGV[13])
redis.call('PEXPIRE', resvexp, ARGV[13])
register()
return answer('ok', reserved + reserve)
