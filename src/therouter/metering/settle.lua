-- settle.lua: apply one generation record exactly once (idempotent by gen id).
-- KEYS: 1 settled marker, 2 record, 3 per:total, 4 per:d:DAY, 5 per:m:MONTH, 6 bymodel:DAY, 7 resv, 8 resvexp,
--       9 the key's usage stream, 10 the TPM window counter charged at admission, 11 the per-model override's
--       TPM window counter (absent unless the key has one), 12 the request-id index, 13 byprov:DAY
--       (all in the key's slot {k:ID});
--       on a single node only (cross-slot on a cluster, where meter.py sends these extras in a call of their own):
--       14 the global usage feed, 15 the key set, 16 the gen:GEN index, 17 the settling instance's in-flight hash
-- ARGV: 1 gen, 2 cost nano, 3 model, 4 prompt, 5 completion, 6 cached, 7 reasoning, 8 record JSON,
--       9 marker ttl s, 10 record ttl s, 11 day ttl s, 12 month ttl s, 13 stream maxlen, 14 actual tokens,
--       15 day id, 16 month id, 17 request id ('' for none), 18 '1': settle only if the reservation still exists
--       (the reaper's orphans: a request that admission refused, or that was settled or released meanwhile, is
--       never settled again), 19 the provider that served ('' for none);
--       with KEYS 14-17: 20 key id, 21 feed maxlen, 22 when a repeat posts the extras too: '0' never, '1' always
--       (a journal entry that owes them), '2' when the gen:GEN index is missing (a replay: the first run's reply
--       may have been lost before its extras were sent by an older version)
-- With KEYS 14-17 the extras (feed XADD, key set SADD, gen:GEN SET, in-flight HDEL) are posted with the first
-- settlement, atomically, and the in-flight entry is deleted by a repeat as well (the request is over either way).
-- Returns {1, stream id} the first time, {0} for a repeat (or a reservation that is gone, with ARGV[18] = '1').
local gen = ARGV[1]
local extras = #KEYS >= 17

local function post()
  redis.call('XADD', KEYS[14], 'MAXLEN', '~', ARGV[21], '*', 'gen', gen, 'key', ARGV[20], 'rec', ARGV[8])
  redis.call('SADD', KEYS[15], ARGV[20])
  redis.call('SET', KEYS[16], ARGV[20], 'EX', ARGV[10])
  redis.call('HDEL', KEYS[17], gen)
end

local function repeated()
  if extras then
    if ARGV[22] == '1' or (ARGV[22] == '2' and redis.call('SET', KEYS[16], ARGV[20], 'NX', 'EX', ARGV[10])) then
      post()
    else
      redis.call('HDEL', KEYS[17], gen)
    end
  end
  return {0}
end

if redis.call('EXISTS', KEYS[2]) == 1 then
  return repeated()
end
if ARGV[18] == '1' and redis.call('HEXISTS', KEYS[7], 'g:' .. gen) == 0 then
  return repeated()
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[9]) then
  return repeated()
end

local reserved_tokens = drop_resv(KEYS[7], KEYS[8], gen)
if reserved_tokens then
  adjust_tokens(KEYS[10], tonumber(ARGV[14]) - reserved_tokens)
  adjust_tokens(KEYS[11], tonumber(ARGV[14]) - reserved_tokens)
end

local fields = {'cost', 'requests', 'prompt_tokens', 'completion_tokens', 'cached_tokens', 'reasoning_tokens'}
local values = {ARGV[2], '1', ARGV[4], ARGV[5], ARGV[6], ARGV[7]}
local function add(key, prefix)
  for i, f in ipairs(fields) do
    redis.call('HINCRBY', key, prefix .. f, values[i])
  end
end
add(KEYS[3], '')
add(KEYS[4], '')
add(KEYS[5], '')
add(KEYS[6], ARGV[3] .. '|')
add(KEYS[13], (ARGV[19] or '') .. '|')
redis.call('EXPIRE', KEYS[4], ARGV[11])
redis.call('EXPIRE', KEYS[5], ARGV[12])
redis.call('EXPIRE', KEYS[6], ARGV[11])
redis.call('EXPIRE', KEYS[13], ARGV[11])
redis.call('SET', KEYS[2], ARGV[8], 'EX', ARGV[10])
if ARGV[17] and ARGV[17] ~= '' then
  redis.call('SET', KEYS[12], gen, 'EX', ARGV[10])
end
local id = redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[13], '*',
                      'gen', gen, 'd', ARGV[15], 'm', ARGV[16], 'rec', ARGV[8])
if extras then
  post()
end
return {1, id}
