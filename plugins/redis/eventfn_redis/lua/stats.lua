-- stats: the counts of one subscription. ARGV: sid.
-- Reply: {in stream (XLEN), leased or expired (PEL), expired, waiting behind a key's head,
-- delayed and due, delayed and not due, dead} or {-1} when the subscription is gone.
local sid = ARGV[1]
local meta = redis.call('HMGET', sub_key(sid, ''), 'group', 'waiting')
if not meta[1] then
  return {-1}
end
local stream, delayed = sub_key(sid, ':stream'), sub_key(sid, ':delayed')
local now = now_ms()
local pending = redis.call('XPENDING', stream, meta[1])[1]
local expired = 0
if pending > 0 then
  expired = #redis.call('XPENDING', stream, meta[1], 'IDLE', MAX_LEASE, '-', '+', pending)
end
return {
  redis.call('XLEN', stream),
  pending,
  expired,
  tonumber(meta[2] or 0),
  redis.call('ZCOUNT', delayed, '-inf', now),
  redis.call('ZCOUNT', delayed, '(' .. now, '+inf'),
  redis.call('ZCARD', sub_key(sid, ':dead')),
}
