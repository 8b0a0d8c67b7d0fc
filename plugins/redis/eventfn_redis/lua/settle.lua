-- settle: a batch of settlements, each fenced by its receipt token.
-- ARGV: consumer, number of emitted destinations, those destinations, then:
--   'a', sid, n, then n tokens              acks that emit nothing, of one subscription
--   'e', sid, token, number emitted, then 8 fields per emitted message (see publish_at)
--   'r', sid, token, delay (ms), failed_at
--   'd', sid, token, error type, error message, traceback, failed_at
--   'l', sid, token
-- Every emitted destination is checked before anything is written, so an unknown one fails
-- the batch whole. Reply: how many settlements still held their lease.
local consumer = ARGV[1]
local missing = unknown_destination(3, tonumber(ARGV[2]))
if missing then
  return redis.error_reply('UNKNOWN_DESTINATION ' .. missing)
end
local now = now_ms()

-- A record's fields with attempts and the first failure as given (other fields unchanged).
local function with_failure(fields, attempts, first_failed)
  local out = {}
  for i = 1, #fields, 2 do
    if fields[i] ~= 'a' and fields[i] ~= 'f' then
      out[#out + 1] = fields[i]
      out[#out + 1] = fields[i + 1]
    end
  end
  out[#out + 1] = 'a'
  out[#out + 1] = attempts
  out[#out + 1] = 'f'
  out[#out + 1] = first_failed
  return out
end

local function entry_fields(sub, entry)
  local found = redis.call('XRANGE', sub.stream, entry, entry)
  return found[1][2]
end

-- The record stays one per subscription and message id: a replayed message that fails
-- again puts its old record back to 'dead', keeping the replay count.
local function dead_letter(sub, fields, attempts, i)
  local message_id, key = get(fields, 'm'), get(fields, 'k')
  local records = sub_key(sub.sid, ':records')
  local rid = redis.call('HGET', records, message_id)
  if not rid then
    rid = redis.call('INCR', P .. 'dlids')
    redis.call('HSET', records, message_id, rid)
  end
  local record = P .. 'dl:' .. rid
  local failed_at = ARGV[i + 3]
  redis.call('HSET', record, 's', sub.name, 'sid', sub.sid, 'm', message_id,
    'b', get(fields, 'b'), 'p', get(fields, 'p'), 'et', ARGV[i], 'em', ARGV[i + 1],
    'tb', ARGV[i + 2], 'n', attempts, 'ff', get(fields, 'f') or failed_at, 'lf', failed_at,
    'st', 'dead')
  redis.call('HSETNX', record, 'r', 0)
  if key then
    redis.call('HSET', record, 'k', key)
  else
    redis.call('HDEL', record, 'k')
  end
  redis.call('ZADD', sub_key(sub.sid, ':dead'), rid, rid)
  redis.call('ZADD', P .. 'dead', rid, rid)
end

-- The key's next record may go once its head is gone for good.
local function leave(sub, key)
  if key and sub.kind == 'stream' then
    advance(sub.sid, key, now)
  end
end

-- Settles one delivery of `sub` if its receipt still holds; ARGV[i] is the first of its
-- extra arguments. Returns 1 if it was held.
local function settle_one(op, sub, token, i)
  local entry, count, rel, key = nil, nil, nil, nil
  if sub then
    entry, count, rel, key = held(sub, token)
  end
  -- The same receipt twice in one batch settles once (its XACK comes at the end).
  if not entry or sub.seen[entry] then
    return 0
  end
  sub.seen[entry] = true
  if op == 'l' then
    -- Given back unstarted: counted in 'released' so the attempt is not raised, and made
    -- idle past any lease so that the next fetch takes it back first.
    redis.call('HINCRBY', sub_key(sub.sid, ':released'), entry, 1)
    redis.call('XCLAIM', sub.stream, sub.group, consumer, 0, entry,
      'TIME', now - MAX_LEASE - 1, 'JUSTID')
    return 1
  end
  if op == 'a' or op == 'e' then
    if op == 'e' then
      local j, after = i + 1, i + 1 + MESSAGE_FIELDS * tonumber(ARGV[i])
      while j < after do
        j = publish_at(j, now)
      end
    end
    leave(sub, key)
  else
    local fields = entry_fields(sub, entry)
    local attempts = tonumber(get(fields, 'a') or 0) + count - rel
    if op == 'r' then
      local failed = with_failure(fields, attempts, get(fields, 'f') or ARGV[i + 1])
      place(sub.sid, failed, now + tonumber(ARGV[i]), now)
    else
      dead_letter(sub, fields, attempts, i)
      leave(sub, key)
    end
  end
  sub.done[#sub.done + 1] = entry
  if rel > 0 then
    sub.released[#sub.released + 1] = entry
  end
  return 1
end

local EXTRA = {r = 2, d = 4, l = 0}

-- Settles what ARGV[i] starts; returns the index after it and how many were still held.
local function settle_at(i)
  local op, sub = ARGV[i], subscription(ARGV[i + 1])
  if op == 'a' then
    local settled, last = 0, i + 2 + tonumber(ARGV[i + 2])
    for j = i + 3, last do
      settled = settled + settle_one(op, sub, ARGV[j], nil)
    end
    return last + 1, settled
  end
  local after = i + 3 + (EXTRA[op] or 1 + MESSAGE_FIELDS * tonumber(ARGV[i + 3]))
  return after, settle_one(op, sub, ARGV[i + 2], i + 3)
end

local i = 3 + tonumber(ARGV[2])
local settled = 0
while i <= #ARGV do
  local was_held
  i, was_held = settle_at(i)
  settled = settled + was_held
end
-- Settled entries leave the stream at once: each stream has one group, so nothing else
-- needs them, and XLEN stays the count of what is ready or leased.
for _, sub in pairs(sub_cache) do
  if sub and #sub.done > 0 then
    call_in_chunks({'XACK', sub.stream, sub.group}, sub.done)
    call_in_chunks({'XDEL', sub.stream}, sub.done)
    if #sub.released > 0 then
      call_in_chunks({'HDEL', sub_key(sub.sid, ':released')}, sub.released)
    end
  end
end
return settled
