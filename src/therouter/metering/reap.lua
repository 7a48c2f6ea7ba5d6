-- reap.lua: forget a lost instance once its requests in flight were settled -- unless it came back meanwhile.
-- KEYS: 1 the instances zset, 2 the instance's in-flight hash (slot {meter})
-- ARGV: 1 instance id, 2 the cutoff (ms): a heartbeat at or before it means lost
-- Returns 1 when the instance was forgotten, 0 when it heartbeated after the cutoff (alive: left alone).
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) > tonumber(ARGV[2]) then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
