-- dead_page: records in state 'dead', oldest first, after a record id.
-- ARGV: sid ('' for every subscription), after (record id, 0 for the start), limit.
-- Reply: per record, its id and its hash as a flat field list.
local index = P .. 'dead'
if ARGV[1] ~= '' then
  index = sub_key(ARGV[1], ':dead')
end
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', index, '(' .. ARGV[2], '+inf', 'LIMIT', 0, ARGV[3])) do
  out[#out + 1] = rid
  out[#out + 1] = redis.call('HGETALL', P .. 'dl:' .. rid)
end
return out
