-- purge: delete the dead-letter records (either state) of some subscriptions.
-- ARGV: subscription ids. Reply: how many records were deleted.
local purged = 0
for _, sid in ipairs(ARGV) do
  local rids = redis.call('HVALS', sub_key(sid, ':records'))
  if #rids > 0 then
    local records = {}
    for i, rid in ipairs(rids) do
      records[i] = P .. 'dl:' .. rid
    end
    call_in_chunks({'UNLINK'}, records)
    call_in_chunks({'ZREM', P .. 'dead'}, rids)
    purged = purged + #rids
  end
  redis.call('UNLINK', sub_key(sid, ':records'), sub_key(sid, ':dead'))
end
return purged
