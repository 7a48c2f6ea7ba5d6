-- common.lua: helpers prepended to admit.lua, settle.lua and release.lua when they are loaded (scripts.py).
-- Numbers are written back to Redis as '%d' strings: Lua's default number format would lose digits.

local function s(n)
  return string.format('%d', n)
end

-- a reservation is "nano|tokens|period|meta" under field g:GEN of the key's resv hash;
-- field s:PERIOD holds the sum of the live reservations of that budget period
local function parse_resv(v)
  local nano, tokens, period = string.match(v, '^(%d+)|(%d+)|([^|]*)')
  return tonumber(nano), tonumber(tokens), period
end

-- forget one reservation (idempotent); returns the tokens it had reserved, or nil if it was already gone
local function drop_resv(resv, resvexp, gen)
  redis.call('ZREM', resvexp, gen)
  local v = redis.call('HGET', resv, 'g:' .. gen)
  if not v then
    return nil
  end
  local nano, tokens, period = parse_resv(v)
  redis.call('HDEL', resv, 'g:' .. gen)
  if redis.call('HINCRBY', resv, 's:' .. period, s(-nano)) <= 0 then
    redis.call('HDEL', resv, 's:' .. period)
  end
  return tokens
end

-- move a TPM window counter by delta (reconcile reserved tokens to actual); a window that has aged out is left alone
local function adjust_tokens(bucket, delta)
  if delta == 0 or redis.call('EXISTS', bucket) == 0 then
    return
  end
  if redis.call('INCRBY', bucket, s(delta)) < 0 then
    redis.call('SET', bucket, '0', 'KEEPTTL')
  end
end
