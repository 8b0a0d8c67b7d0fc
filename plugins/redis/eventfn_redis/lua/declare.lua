-- declare: create destinations and subscriptions that do not exist yet.
-- ARGV: per subscription: name, destination, kind, group, types ('' for every type, else a
-- JSON list). Everything is checked before anything is written. Reply: the subscription ids.
local kinds = {}
for i = 1, #ARGV, 5 do
  local name, dest, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local known = kinds[dest] or redis.call('HGET', P .. 'destinations', dest)
  if known and known ~= kind then
    return redis.error_reply('KIND_CONFLICT ' .. known .. ' ' .. dest)
  end
  kinds[dest] = kind
  local sid = redis.call('HGET', P .. 'subscriptions', name)
  if sid then
    local owner = redis.call('HGET', sub_key(sid, ''), 'destination')
    if owner ~= dest then
      return redis.error_reply('NAME_CONFLICT ' .. tostring(owner) .. ' ' .. name)
    end
  end
end
local sids = {}
for i = 1, #ARGV, 5 do
  local name, dest, kind, group, types = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  redis.call('HSETNX', P .. 'destinations', dest, kind)
  local sid = redis.call('HGET', P .. 'subscriptions', name)
  if sid then
    -- A redeployed app may subscribe its group to other event types: the latest filter wins.
    redis.call('HSET', sub_key(sid, ''), 'types', types)
  else
    sid = tostring(redis.call('INCR', P .. 'ids'))
    redis.call('HSET', P .. 'subscriptions', name, sid)
    redis.call('HSET', sub_key(sid, ''), 'name', name, 'destination', dest, 'kind', kind,
      'group', group, 'types', types, 'waiting', 0)
    redis.call('XGROUP', 'CREATE', sub_key(sid, ':stream'), group, '0', 'MKSTREAM')
    redis.call('SADD', P .. 'fan:' .. dest, sid)
  end
  sids[#sids + 1] = sid
end
return sids
