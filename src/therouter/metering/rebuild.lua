-- rebuild.lua: overwrite a key's counters with totals recomputed from its usage stream, unless a record was
-- added since they were computed (then the caller recomputes and tries again).
-- KEYS: 1 the key's usage stream, 2.. the counter hashes to overwrite   (the key's slot {k:ID})
-- ARGV: 1 the stream's last id the totals cover, 2 JSON list aligned with KEYS[2..]: {fields = {f = "n"}, always}
-- A counter is rewritten when it exists (keeping its remaining TTL) or when `always` (the permanent total); a
-- period counter that already expired is not brought back. Returns 1 when written, 0 when the stream moved on.
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
if last_id ~= ARGV[1] then
  return 0
end
local spec = cjson.decode(ARGV[2])
for i, item in ipairs(spec) do
  local key = KEYS[i + 1]
  local ttl = redis.call('PTTL', key)
  if item.always == true or ttl ~= -2 then
    redis.call('DEL', key)
    local flat = {}
    for f, n in pairs(item.fields) do
      flat[#flat + 1] = f
      flat[#flat + 1] = n
    end
    if #flat > 0 then
      redis.call('HSET', key, unpack(flat))
      if ttl > 0 then
        redis.call('PEXPIRE', key, ttl)
      end
    end
  end
end
return 1
