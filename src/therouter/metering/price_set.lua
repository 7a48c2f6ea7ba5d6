-- price_set.lua: write a new price version, atomically numbered.
-- KEYS: 1 price:{MODEL} hash (newest version), 2 pricehist:{MODEL} zset (every version JSON by effective_at)
-- ARGV: 1 source (config | operator), 2 model, 3 input, 4 cached_input, 5 output (nano-USD per 1M tokens),
--       6 effective_at (unix s; a config write of a model's first price uses 0),
--       7 cache_write (nano-USD per 1M tokens written to the provider's cache; '' = none: billed at input)
-- A "config" write happens only when the model has no price yet, or its newest version also came from config and
-- has different numbers: an operator's price is never clobbered by the config file.
-- Returns {written (1|0), version}.
local cache_write = ARGV[7] or ''
local cur = redis.call('HMGET', KEYS[1], 'version', 'source', 'input', 'cached_input', 'output', 'cache_write')
local version = tonumber(cur[1] or '0')
if not version or version < 0 or version ~= math.floor(version) then
  version = redis.call('ZCARD', KEYS[2]) -- a damaged hash (by hand): one version per history entry
end
if ARGV[1] == 'config' and version > 0 then
  if cur[2] ~= 'config' then
    return {0, version}
  end
  if cur[3] == ARGV[3] and cur[4] == ARGV[4] and cur[5] == ARGV[5] and (cur[6] or '') == cache_write then
    return {0, version}
  end
end
local effective_at = ARGV[6]
if ARGV[1] == 'config' and version == 0 then
  effective_at = '0' -- a model's first price has always applied
end
version = version + 1
local v = string.format('%d', version)
redis.call('HSET', KEYS[1], 'model', ARGV[2], 'version', v, 'effective_at', effective_at, 'input', ARGV[3],
           'cached_input', ARGV[4], 'output', ARGV[5], 'source', ARGV[1], 'cache_write', cache_write)
local fields = {model = ARGV[2], version = v, effective_at = effective_at, input = ARGV[3],
                cached_input = ARGV[4], output = ARGV[5], source = ARGV[1]}
if cache_write ~= '' then
  fields['cache_write'] = cache_write
end
local doc = cjson.encode(fields)
redis.call('ZADD', KEYS[2], effective_at, doc)
return {1, version}
