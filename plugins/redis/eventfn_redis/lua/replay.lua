-- replay: dead-lettered messages back to their own subscription, same id, attempt 1.
-- ARGV: record ids. Records not in state 'dead' (or of a subscription that is gone) are
-- skipped. Reply: how many were replayed.
local now = now_ms()
local replayed = 0
for _, rid in ipairs(ARGV) do
  local record = P .. 'dl:' .. rid
  local r = redis.call('HMGET', record, 'st', 'sid', 'm', 'b', 'p', 'k')
  local kind = r[2] and redis.call('HGET', sub_key(r[2], ''), 'kind')
  if r[1] == 'dead' and kind then
    local fields = {'m', r[3], 'b', r[4], 'p', r[5]}
    if r[6] then
      fields[7], fields[8] = 'k', r[6]
    end
    enqueue(r[2], kind, fields, r[6], 0, now)
    redis.call('HSET', record, 'st', 'replayed')
    redis.call('HINCRBY', record, 'r', 1)
    redis.call('ZREM', sub_key(r[2], ':dead'), rid)
    redis.call('ZREM', P .. 'dead', rid)
    replayed = replayed + 1
  end
end
return replayed
