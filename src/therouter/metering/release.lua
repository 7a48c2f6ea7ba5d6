-- release.lua: give a failed or rejected request's whole reservation back (idempotent).
-- KEYS: 1 resv, 2 resvexp, 3 the TPM window counter charged at admission, 4 the per-model override's one
--       (the key's slot {k:ID})
-- ARGV: 1 gen.  Returns 1 when a reservation was released, 0 when there was none (already settled/released).
local tokens = drop_resv(KEYS[1], KEYS[2], ARGV[1])
if not tokens then
  return 0
end
adjust_tokens(KEYS[3], -tokens)
adjust_tokens(KEYS[4], -tokens)
return 1
