-- Prepended to every script: key names, server time, and where a record goes.
-- KEYS[1] is the namespace prefix ("eventfn:"); every key a script touches starts with it.
-- The key layout and the reasons for it are in the plug-in's README.

local P = KEYS[1]

-- Leases are kept as idle time: a delivery leased for L ms gets its delivery time set to
-- now + L - MAX_LEASE, so that it is idle for MAX_LEASE ms exactly when its lease runs out.
-- One XPENDING ... IDLE MAX_LEASE then finds every expired lease, whatever its length.
local MAX_LEASE = 604800000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function sub_key(sid, suffix)
  return P .. 'sub:' .. sid .. suffix
end

-- The value of a field in a stream entry's flat field list.
local function get(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then
      return fields[i + 1]
    end
  end
  return nil
end

-- A variadic command over many items, split to stay under Lua's unpack limit.
local function call_in_chunks(head, items)
  for start = 1, #items, 1000 do
    local args = {unpack(head)}
    for i = start, math.min(#items, start + 999) do
      args[#args + 1] = items[i]
    end
    redis.call(unpack(args))
  end
end

local function xadd(sid, fields)
  local args = {'XADD', sub_key(sid, ':stream'), '*'}
  for i = 1, #fields do
    args[#args + 1] = fields[i]
  end
  redis.call(unpack(args))
end

-- A record becomes fetchable: in the stream now, or in the delayed set until it is due.
-- The set's members carry a sequence number so that two equal records stay two members.
local function place(sid, fields, due, now)
  if due > now then
    local seq = redis.call('INCR', P .. 'seq')
    redis.call('ZADD', sub_key(sid, ':delayed'), due, cmsgpack.pack(seq, fields))
  else
    xadd(sid, fields)
  end
end

-- A new record of a subscription. In a stream a keyed record becomes its key's head only
-- when the key has nothing unsettled; otherwise it waits in the key's list, in order.
local function enqueue(sid, kind, fields, key, due, now)
  if kind == 'stream' and key then
    if redis.call('HSETNX', sub_key(sid, ':heads'), key, 1) == 0 then
      redis.call('RPUSH', sub_key(sid, ':key:' .. key), cmsgpack.pack(due, fields))
      redis.call('HINCRBY', sub_key(sid, ''), 'waiting', 1)
      return
    end
  end
  place(sid, fields, due, now)
end

-- A key's head is gone for good (acked or dead-lettered): the key's next record is its head.
local function advance(sid, key, now)
  local nxt = redis.call('LPOP', sub_key(sid, ':key:' .. key))
  if not nxt then
    redis.call('HDEL', sub_key(sid, ':heads'), key)
    return
  end
  redis.call('HINCRBY', sub_key(sid, ''), 'waiting', -1)
  local due, fields = cmsgpack.unpack(nxt)
  place(sid, fields, due, now)
end

-- The subscriptions a destination has right now, each with its kind and type filter.
local fanout_cache = {}
local function fanout(dest)
  local cached = fanout_cache[dest]
  if cached then
    return cached
  end
  local found = {}
  for _, sid in ipairs(redis.call('SMEMBERS', P .. 'fan:' .. dest)) do
    local meta = redis.call('HMGET', sub_key(sid, ''), 'kind', 'types')
    local types = nil
    if meta[2] and meta[2] ~= '' then
      types = {}
      for _, name in ipairs(cjson.decode(meta[2])) do
        types[name] = true
      end
    end
    found[#found + 1] = {sid, meta[1], types}
  end
  fanout_cache[dest] = found
  return found
end

-- The first of ARGV[first .. first + count - 1] that names no declared destination.
local function unknown_destination(first, count)
  for i = first, first + count - 1 do
    if redis.call('HEXISTS', P .. 'destinations', ARGV[i]) == 0 then
      return ARGV[i]
    end
  end
  return nil
end

-- A message with dedupe (a window in ms) is stored only if its id was not stored to its
-- destination with dedupe within the window: the key 'dd:' holds when it was (server time, in
-- ms) and expires at the end of that message's own window, so that records clean themselves
-- up. The check, the record and the message are written by one script: atomically.
local function first_of_window(dest, id, window, now)
  local key = P .. 'dd:' .. #dest .. ':' .. dest .. ':' .. id
  local stored = redis.call('GET', key)
  if stored and tonumber(stored) > now - window then
    return false
  end
  redis.call('SET', key, now, 'PX', window)
  return true
end

-- Arguments per message of publish_at.
local MESSAGE_FIELDS = 8

-- Publishes the message at ARGV[i .. i + 7] (destination, id, type, body, key, published_at,
-- delay in ms, dedupe in ms) to every subscription its destination has now, unless dedupe
-- drops it; returns the index after it. A key is sent as '' for none and as '=' .. key
-- otherwise, so that '' stays a valid key.
local function publish_at(i, now)
  local dest, mtype, key, delay = ARGV[i], ARGV[i + 2], ARGV[i + 4], tonumber(ARGV[i + 6])
  local window = tonumber(ARGV[i + 7])
  if window > 0 and not first_of_window(dest, ARGV[i + 1], window, now) then
    return i + MESSAGE_FIELDS
  end
  local fields = {'m', ARGV[i + 1], 'b', ARGV[i + 3], 'p', ARGV[i + 5]}
  if key == '' then
    key = nil
  else
    key = string.sub(key, 2)
    fields[7], fields[8] = 'k', key
  end
  local due = 0
  if delay > 0 then
    due = now + delay
  end
  for _, target in ipairs(fanout(dest)) do
    if not target[3] or target[3][mtype] then
      enqueue(target[1], target[2], fields, key, due, now)
    end
  end
  return i + MESSAGE_FIELDS
end

-- Subscription facts a settle or extend needs, read once per script run.
local sub_cache = {}
local function subscription(sid)
  local cached = sub_cache[sid]
  if cached == nil then
    local meta = redis.call('HMGET', sub_key(sid, ''), 'group', 'kind', 'name')
    cached = false
    if meta[1] then
      cached = {sid = sid, group = meta[1], kind = meta[2], name = meta[3],
                stream = sub_key(sid, ':stream'), done = {}, released = {}, seen = {}}
    end
    sub_cache[sid] = cached
  end
  return cached
end

-- A receipt token is "entry-id count releases", then " =" .. key for a keyed record. The
-- delivery is still held under it when the entry is pending with that delivery count (the
-- count rises with every lease and never falls). Returns the entry, count, releases and key.
local function held(sub, token)
  local entry, count, rel, rest = string.match(token, '^(%S+) (%d+) (%d+)(.*)$')
  if not entry then
    return nil
  end
  local pending = redis.call('XPENDING', sub.stream, sub.group, entry, entry, 1)
  if pending[1] == nil or pending[1][4] ~= tonumber(count) then
    return nil
  end
  local key = nil
  if rest ~= '' then
    key = string.sub(rest, 3)
  end
  return entry, tonumber(count), tonumber(rel), key
end
