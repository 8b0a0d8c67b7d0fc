-- fetch: lease up to `limit` deliveries of one subscription.
-- ARGV: sid, group, consumer, limit, lease (ms).
-- Reply: {n, then per delivery a header, the message id and the body (see add) or, with
-- nothing to lease, {0, last delivered entry id, next due (ms or
-- -1), now (ms)} for the caller to block on; {-1} when the subscription is gone.
local sid, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local limit, lease = tonumber(ARGV[4]), math.min(tonumber(ARGV[5]), MAX_LEASE)
if redis.call('EXISTS', sub_key(sid, '')) == 0 then
  return {-1}
end
local stream = sub_key(sid, ':stream')
local now = now_ms()
local leased_until = now + lease - MAX_LEASE

-- Retries and delayed messages that came due go behind what is in the stream already.
local delayed = sub_key(sid, ':delayed')
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  for _, packed in ipairs(due) do
    local _, fields = cmsgpack.unpack(packed)
    xadd(sid, fields)
  end
  call_in_chunks({'ZREM', delayed}, due)
end

local out = {0}
local released = sub_key(sid, ':released')
-- Three values per delivery: a header, the message id and the body. The header is
-- "attempt<TAB>published_at<TAB>first_failed_at<TAB>receipt token" (see held): the token
-- comes last because a key, at its end, may hold any byte.
local function add(entry, count, rel, fields)
  -- One pass over the fields: this runs for every delivery.
  local id, body, published, key, attempts, first = nil, nil, nil, '', 0, ''
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if name == 'b' then
      body = value
    elseif name == 'm' then
      id = value
    elseif name == 'p' then
      published = value
    elseif name == 'k' then
      key = ' =' .. value
    elseif name == 'a' then
      attempts = tonumber(value)
    elseif name == 'f' then
      first = value
    end
  end
  local n = #out
  out[n + 1] = (attempts + count - rel) .. '\t' .. published .. '\t' .. first .. '\t'
    .. entry .. ' ' .. count .. ' ' .. rel .. key
  out[n + 2] = id
  out[n + 3] = body
  out[1] = out[1] + 1
end

-- Leases that ran out, and released deliveries, come back first. XPENDING rather than
-- XAUTOCLAIM: it gives each entry's delivery count, which XAUTOCLAIM does not return.
local expired = redis.call('XPENDING', stream, group, 'IDLE', MAX_LEASE, '-', '+', limit)
if #expired > 0 then
  local counts = {}
  local args = {'XCLAIM', stream, group, consumer, MAX_LEASE}
  for _, pending in ipairs(expired) do
    counts[pending[1]] = pending[4]
    args[#args + 1] = pending[1]
  end
  args[#args + 1] = 'TIME'
  args[#args + 1] = leased_until
  local any_released = redis.call('EXISTS', released) == 1
  -- XCLAIM (without JUSTID) raises each delivery count by one.
  for _, entry in ipairs(redis.call(unpack(args))) do
    local rel = 0
    if any_released then
      rel = tonumber(redis.call('HGET', released, entry[1]) or 0)
    end
    add(entry[1], counts[entry[1]] + 1, rel, entry[2])
  end
end

if out[1] < limit then
  local got = redis.call(
    'XREADGROUP', 'GROUP', group, consumer, 'COUNT', limit - out[1], 'STREAMS', stream, '>')
  if got then
    -- JUSTID leaves the delivery count (1) as it is and only moves the delivery time.
    local args = {'XCLAIM', stream, group, consumer, 0}
    for _, entry in ipairs(got[1][2]) do
      args[#args + 1] = entry[1]
      add(entry[1], 1, 0, entry[2])
    end
    args[#args + 1] = 'TIME'
    args[#args + 1] = leased_until
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
  end
end

if out[1] > 0 then
  return out
end
local last = '0-0'
for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  if get(info, 'name') == group then
    last = get(info, 'last-delivered-id')
  end
end
local next_due = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
return {0, last, tonumber(next_due[2] or -1), now}
